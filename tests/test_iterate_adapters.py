"""An iterate run's one LoRA adapter (export.lora=adapter): the rounds' adapters stacked over the initial model
give the model the rounds' merges built, and the driver writes it where a single run's export goes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mdpo_ray.config import ConfigError, LoraConfig, load_config
from mdpo_ray.iterate import adapters
from mdpo_ray.training import lora

INPUT_IDS = torch.arange(24).reshape(2, 12) % 16  # within the character vocabulary


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _train_round(start, out, seed: int) -> None:
    """A round's `both` export without training: fresh adapters (r=4, alpha=8) over the model at `start`, with a
    random nonzero B, saved to out/adapter; out itself is the merged model W = W_start + (alpha / r) B A."""
    torch.manual_seed(seed)
    policy = lora.wrap(AutoModelForCausalLM.from_pretrained(start), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)  # B = 0 would make every round a no-op, and the test one that cannot fail
    tokenizer = AutoTokenizer.from_pretrained(start)
    policy.save_pretrained(out / lora.ADAPTER_DIR)
    tokenizer.save_pretrained(out / lora.ADAPTER_DIR)
    policy.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def two_rounds(tiny_task, tmp_path_factory):
    """W0 (the tiny model), then W1 = W0 + s B1 A1 and W2 = W1 + s B2 A2, each round's export with its adapter."""
    root = tmp_path_factory.mktemp("rounds")
    _train_round(tiny_task["model"], root / "round_0", seed=1)
    _train_round(root / "round_0", root / "round_1", seed=2)
    return tiny_task["model"], root / "round_0", root / "round_1"


def test_the_stacked_adapter_over_the_initial_model_gives_the_last_rounds_merged_model(two_rounds, tmp_path):
    from peft import PeftModel

    initial, first, last = two_rounds
    config = adapters.write_stacked([str(first / "adapter"), str(last / "adapter")], str(initial),
                                    str(tmp_path / "stacked"), run_name="t")
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 16, str(initial))
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(initial), tmp_path / "stacked")
    merged_last = _logits(AutoModelForCausalLM.from_pretrained(last))
    torch.testing.assert_close(_logits(stacked), merged_last, rtol=0, atol=1e-5)  # fp32 rounding of the merges
    for other in (initial, first):  # the rounds did change the model: the comparison above can fail
        assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(other)), merged_last, atol=1e-3)


def test_the_driver_writes_the_stacked_adapter_where_a_single_runs_export_goes(two_rounds, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from mdpo_ray.launch_rounds import stacked_export

    initial, first, last = two_rounds
    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.name_or_path={initial}", "model.lora.r=4",
                             "model.lora.alpha=8", "export.lora=adapter", "iterate.rounds=2"])
    location = stacked_export(cfg, [{"round": 0, "export": str(first)}, {"round": 1, "export": str(last)}])
    assert location == str(cfg.run_dir / "export")
    export = cfg.run_dir / "export"
    assert json.loads((export / adapters.CONFIG_FILE).read_text())["base_model_name_or_path"] == str(initial)
    assert (export / "tokenizer_config.json").is_file() and not (export / "model.safetensors").exists()
    assert "stacked into one of rank 8" in (export / "README.md").read_text()
    loaded = AutoPeftModelForCausalLM.from_pretrained(export)  # the base named in its config: the initial model
    torch.testing.assert_close(_logits(loaded), _logits(AutoModelForCausalLM.from_pretrained(last)), rtol=0, atol=1e-5)


def test_rounds_exported_without_their_adapters_are_an_error_naming_the_key(tmp_path):
    from mdpo_ray.launch_rounds import stacked_export

    cfg = load_config(None, [f"output_dir={tmp_path}", "model.name_or_path=/models/sft", "data.train=/d.jsonl",
                             "model.lora.r=4", "export.lora=adapter", "iterate.rounds=2"])
    with pytest.raises(ConfigError, match="iterate round 0 exported none") as info:
        stacked_export(cfg, [{"round": 0, "export": str(tmp_path / "r0" / "export")}])
    assert "export.lora=merged" in str(info.value)


def test_a_rerun_whose_finished_rounds_ran_merged_is_refused_before_anything_trains(tmp_path, monkeypatch):
    from mdpo_ray import launch, launch_rounds
    from mdpo_ray.iterate import store

    cfg = load_config(None, [f"output_dir={tmp_path}", "model.name_or_path=/models/sft", "data.train=/d.jsonl",
                             "model.lora.r=4", "export.lora=adapter", "iterate.rounds=3"])
    store.save_done(store.round_location(cfg.run_location, 0), {"round": 0, "export": str(tmp_path / "r0" / "export")})
    monkeypatch.setattr(launch, "tracked_run", lambda *a, **k: pytest.fail("MLflow was asked for a run"))
    with pytest.raises(ConfigError, match="iterate round 0 exported none"):
        launch_rounds.train_rounds(cfg)


def _adapter(config_changes: dict | None = None, extra: dict | None = None) -> tuple[dict, dict]:
    tensors = {"m.q_proj.lora_A.weight": torch.ones(2, 3), "m.q_proj.lora_B.weight": torch.ones(5, 2)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    return tensors | (extra or {}), config | (config_changes or {})


def test_adapters_stack_along_the_rank_and_those_that_cannot_are_refused_naming_why():
    tensors, config = adapters.stack_adapters(
        [_adapter(), _adapter({"target_modules": ["v_proj", "q_proj"]})], "base")  # a set's order may differ
    assert tensors["m.q_proj.lora_A.weight"].shape == (4, 3) and tensors["m.q_proj.lora_B.weight"].shape == (5, 4)
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "base")
    refused = {"use_rslora=True": [_adapter(), _adapter({"use_rslora": True})],
               "rank_pattern": [_adapter({"rank_pattern": {"q_proj": 8}})],
               "lora_magnitude_vector": [_adapter(extra={"m.q_proj.lora_magnitude_vector": torch.ones(5)})],
               "in r, lora_alpha": [_adapter(), _adapter({"r": 4, "lora_alpha": 8})],
               "in the layers it adapts": [_adapter(), _adapter(extra={"m.v_proj.lora_A.weight": torch.ones(2, 3)})]}
    for needle, rounds in refused.items():
        with pytest.raises(ValueError, match="iterate round") as info:
            adapters.stack_adapters(rounds, "base")
        assert needle in str(info.value)
