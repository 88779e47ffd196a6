"""The memory planner: exact parameter counts from a meta-device build, the rows' invariants (sharding,
LoRA, checkpointing), the suggestion path, and the CLI (`mdpo-ray plan`, the verdict line of train).

The planned bytes themselves are checked against measured peaks by benchmarks/memory.py (minutes);
here only what must hold whatever the calibration."""

import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mdpo_ray
from mdpo_ray import cli
from mdpo_ray.config import ConfigError, load_config
from mdpo_ray.planning import footprint, planner
from mdpo_ray.training import logps

LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=32000)
LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, vocab_size=300)


def _model_dir(tmp_path, **config):
    LlamaConfig(**config).save_pretrained(tmp_path)  # config.json only: the planner reads nothing else
    return tmp_path


def _cfg(model_dir, *overrides):
    return load_config(None, [f"model.name_or_path={model_dir}", "data.train=pairs.jsonl", *overrides])


def _row(plan, name):
    (row,) = [r for r in plan.rows if r.name == name]
    return row.bytes


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_match_a_real_model(tmp_path, tied):
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))
    shape = planner.plan(_cfg(_model_dir(tmp_path, **TINY, tie_word_embeddings=tied))).shape
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert shape.params == sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert (shape.blocks, shape.block_params) == (len(blocks), max(blocks))
    assert shape.root_params == shape.params - sum(blocks)
    assert shape.root_params == (1 if tied else 2) * TINY["vocab_size"] * TINY["hidden_size"] + TINY["hidden_size"]
    assert shape.trainable == shape.params and shape.head_trainable == model.lm_head.weight.numel()


def test_lora_counts_the_adapters_exactly_and_drops_the_reference_copy(tmp_path):
    import peft

    model_dir = _model_dir(tmp_path, **TINY)
    full = planner.plan(_cfg(model_dir, "scaling.num_workers=1"))
    lora = planner.plan(_cfg(model_dir, "scaling.num_workers=1", "model.lora.r=8"))
    real = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), peft.LoraConfig(r=8, target_modules="all-linear"))
    assert lora.shape.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert lora.shape.adapters_per_block == 7  # q, k, v, o, gate, up, down
    for name in ("gradients, fp32 shards", "AdamW state, fp32 shards"):
        assert _row(lora, name) < 0.2 * _row(full, name)
    assert _row(full, "reference, shards") > 0
    assert [r.bytes for r in lora.rows if r.name.split(",")[0] == "reference"] == [0]  # adapters off: no copy
    assert lora.tensor_bytes < full.tensor_bytes


def test_sharded_rows_divide_by_the_number_of_gpus(tmp_path):
    cfg = _cfg(_model_dir(tmp_path, **TINY), "scaling.use_gpu=true", "optim.batch_size=8", "scaling.num_workers=1")
    one, four = planner.plan(cfg), planner.plan(cfg, gpus=4)
    for name in ("parameters, fp32 shards", "gradients, fp32 shards", "AdamW state, fp32 shards", "reference, shards"):
        assert _row(four, name) == pytest.approx(_row(one, name) / 4)
    assert _row(four, "parameters, gathered root") == _row(one, "parameters, gathered root")


def test_checkpointing_keeps_only_block_inputs_and_counts_the_configured_row(tmp_path):
    model_dir = _model_dir(tmp_path, **TINY)
    plain = planner.plan(_cfg(model_dir, "data.max_length=1024"))
    checkpointed = planner.plan(_cfg(model_dir, "data.max_length=1024", "scaling.activation_checkpointing=true"))
    for p in (plain, checkpointed):  # both shown, only the configured one counted
        off, on = (next(r for r in p.rows if r.name == f"activations, {k}checkpointing") for k in ("no ", ""))
        assert on.bytes < off.bytes / 4
        assert (off.counted, on.counted) == (not p.settings.checkpointing, p.settings.checkpointing)
    assert checkpointed.tensor_bytes < plain.tensor_bytes


def test_a_block_keeps_what_the_formula_says(tmp_path):
    """layer_saved_per_token against the tensors autograd really saves in one Llama block (fp32, a padded
    batch): the difference between a 2-block and a 1-block model, so embeddings and head cancel out."""
    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": layers})))
        ids = torch.randint(0, TINY["vocab_size"], (4, 96))
        mask = torch.ones_like(ids)
        mask[1:, -7:] = 0  # padding: the mask SDPA gets, as in a chosen+rejected batch
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=mask)
        weights = sum(p.numel() * 4 for p in model.parameters())  # weights saved for backward are not activations
        return sum(storages.values()) - weights

    shape = planner.plan(_cfg(_model_dir(tmp_path, **TINY))).shape
    measured = saved_bytes(2) - saved_bytes(1)
    assert footprint.layer_saved_per_token(shape, 4, 96) * 4 * 96 == pytest.approx(measured, rel=0.02)


def test_selective_checkpointing_keeps_what_its_formula_says_and_less_than_no_checkpointing(tmp_path):
    """layer_kept_selective against what a forward under distributed.checkpoint_blocks leaves allocated (the
    profiler's CPU memory: autograd's hooks cannot see selective checkpointing's cache), a 2-block model less a
    1-block one; and the gradients are those of the plain model."""
    from torch.profiler import ProfilerActivity, profile

    from mdpo_ray.training import distributed

    ids = torch.randint(0, TINY["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(0))

    def held_and_grads(layers: int, selective: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": layers})))
        if selective:
            distributed.checkpoint_blocks(model, list(model.model.layers), selective=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model.model(input_ids=ids, use_cache=False).last_hidden_state
        out.pow(2).mean().backward()
        return sum(e.self_cpu_memory_usage for e in prof.events()), [p.grad for p in model.parameters()]

    (two, grads), (one, _) = held_and_grads(2, True), held_and_grads(1, True)
    shape = planner.plan(_cfg(_model_dir(tmp_path, **TINY))).shape
    assert footprint.layer_kept_selective(shape, 4) * ids.numel() == pytest.approx(two - one, rel=0.05)
    (plain_two, plain_grads), (plain_one, _) = held_and_grads(2, False), held_and_grads(1, False)
    assert two - one < 0.7 * (plain_two - plain_one)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_a_70b_full_finetune_does_not_fit_on_8x80gb_and_the_suggestion_does(tmp_path):
    cfg = _cfg(_model_dir(tmp_path, **LLAMA_70B), "scaling.use_gpu=true", "scaling.num_workers=8",
               "optim.batch_size=64", "data.max_length=2048")
    plan = planner.plan(cfg, gpu_memory_gib=80)
    assert not plan.fits and plan.shape.params > 68e9
    suggestions = planner.suggest(plan)
    assert suggestions and all(q.fits for _, q in suggestions)
    change, fitting = suggestions[0]
    assert change["model.lora.r"] == planner.LORA_RANK  # 69B of fp32 master weights + AdamW cannot fit on 8
    assert fitting.total_bytes <= 80 * 2**30
    assert "does not fit" in planner.one_line(plan) and "--set model.lora.r=16" in planner.one_line(plan)


def test_a_token_budget_bounds_the_activations_and_the_suggestion_lowers_it(tmp_path):
    """optim.micro_batch_tokens: a forward holds at most that many tokens, so the activations are those of
    that many; the suggestion for a run that does not fit halves the budget, not the micro-batch."""
    def activations(*overrides):
        return _row(planner.plan(_cfg(_model_dir(tmp_path, **TINY), "optim.batch_size=8", "data.max_length=1024",
                                      *overrides)), "activations, no checkpointing")

    assert activations("optim.micro_batch_tokens=4096") == activations("optim.micro_batch_size=2")  # 2 x 2 x 1024
    assert activations("optim.micro_batch_tokens=1000000") == activations()  # no more than the whole slice
    cpu = planner.plan(_cfg(_model_dir(tmp_path, **TINY), "data.max_length=1024", "optim.micro_batch_tokens=4096"))
    assert "forwards of at most 4096 tokens" in planner.one_line(cpu)

    cfg = _cfg(_model_dir(tmp_path / "7b", **LLAMA_7B), "scaling.use_gpu=true", "scaling.num_workers=8",
               "optim.batch_size=64", "data.max_length=2048", "optim.micro_batch_tokens=65536")
    plan = planner.plan(cfg, gpu_memory_gib=80)
    assert not plan.fits and "forwards of at most 65536 tokens" in planner.report(plan)
    change, fitting = planner.suggest(plan)[0]
    assert change.keys() - {"optim.sync_every_micro_batch"} == {"optim.micro_batch_tokens"}  # no checkpointing yet
    assert 4096 <= change["optim.micro_batch_tokens"] < 65536
    assert fitting.fits and "--set optim.micro_batch_tokens=" in planner.one_line(plan)


def test_the_chunk_size_is_the_one_logps_uses():
    assert footprint.CHUNK_FLOATS == logps.CHUNK_FLOATS


def test_plan_for_a_batch_the_gpus_do_not_divide_is_a_config_error(tiny_task):
    cfg = load_config(None, [f"model.name_or_path={tiny_task['model']}", f"data.train={tiny_task['train']}",
                             "optim.batch_size=4"])
    with pytest.raises(ConfigError, match="--gpus 3"):
        planner.plan(cfg, gpus=3)


def test_cli_plan_prints_the_table_and_verdict_and_exits_0(tiny_task, capsys):
    argv = ["plan", "--set", f"model.name_or_path={tiny_task['model']}", "--set", f"data.train={tiny_task['train']}"]
    assert cli.main([*argv, "--set", "scaling.use_gpu=true", "--gpus", "2", "--gpu-memory-gib", "0.5"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters, fp32 shards", "activations, no checkpointing", "logits, kept for backward",
                 "overhead", "total", "plan: does not fit"):  # 1 GiB of CUDA context alone exceeds 0.5 GiB
        assert text in out, out
    assert cli.main(argv) == 0
    assert "plan: CPU run, peak ~" in capsys.readouterr().out


def test_cli_plan_refuses_a_bad_key_with_exit_2(capsys):
    assert cli.main(["plan", "--set", "optim.no_such_key=1"]) == 2
    assert "optim.no_such_key: unknown key" in capsys.readouterr().err


@pytest.fixture
def fake_launch(monkeypatch, capsys):
    """`mdpo_ray.launch` without Ray: records what train had printed before it was called."""
    seen = {}

    def train(cfg):
        seen["printed_before_launch"] = capsys.readouterr().out
        return "summary"

    fake = types.SimpleNamespace(check_data=lambda cfg: None, train=train, describe=lambda summary: "launched")
    monkeypatch.setitem(sys.modules, "mdpo_ray.launch", fake)
    monkeypatch.setattr(mdpo_ray, "launch", fake, raising=False)
    return seen


def test_train_prints_the_plan_line_before_ray_starts(tiny_task, fake_launch, capsys):
    argv = ["train", "--set", f"model.name_or_path={tiny_task['model']}", "--set", f"data.train={tiny_task['train']}"]
    assert cli.main([*argv, "--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=1"]) == 0
    assert fake_launch["printed_before_launch"].startswith("plan: fits, ~")
    assert capsys.readouterr().out.strip() == "launched"


def test_train_goes_on_when_the_plan_cannot_read_the_model(tmp_path, fake_launch):
    missing = tmp_path / "not-a-model"  # not a directory: read as a hub id, and the hub is offline in tests
    assert cli.main(["train", "--set", f"model.name_or_path={missing.name}", "--set", "data.train=x.jsonl"]) == 0
    assert fake_launch["printed_before_launch"].startswith("plan: skipped (")


def test_accumulating_across_ranks_holds_a_whole_fp32_gradient_unless_it_syncs_every_micro_batch(tmp_path):
    """FSDP2 without a reduce-scatter per micro-batch sums each rank's full gradient, unsharded, in fp32."""
    model_dir = _model_dir(tmp_path, **TINY)
    base = ["scaling.num_workers=4", "optim.batch_size=16"]
    name = "gradients, unsharded fp32, accumulating"
    no_sync = planner.plan(_cfg(model_dir, *base, "optim.micro_batch_size=2"), gpu_memory_gib=80)
    assert _row(no_sync, name) == 4 * no_sync.shape.trainable
    for overrides in (["optim.micro_batch_size=2", "optim.sync_every_micro_batch=true"],  # reduce-scattered
                      []):  # one micro-batch: nothing to accumulate
        assert not [r for r in planner.plan(_cfg(model_dir, *base, *overrides), gpu_memory_gib=80).rows
                    if r.name == name]
    one_rank = planner.plan(_cfg(model_dir, "scaling.num_workers=1", "optim.micro_batch_size=2"), gpu_memory_gib=80)
    assert not [r for r in one_rank.rows if r.name == name]  # one rank: its gradient is whole anyway


def test_the_attention_kernel_asked_for_is_the_one_loaded_and_planned(tmp_path):
    """model.attn_implementation reaches transformers where the loop loads the model, and the plan counts
    eager attention's T x T probabilities, which sdpa does not keep."""
    from mdpo_ray.training.model import load_causal_lm

    model_dir = _model_dir(tmp_path, **TINY)
    for attention in ("eager", "sdpa"):
        model = load_causal_lm(_cfg(model_dir, f"model.attn_implementation={attention}").model, trainable=False,
                               weights=False)
        assert model.config._attn_implementation == attention
    eager, sdpa = (planner.plan(_cfg(model_dir, "data.max_length=1024", f"model.attn_implementation={attention}"))
                   for attention in ("eager", "sdpa"))
    assert eager.tensor_bytes > sdpa.tensor_bytes
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'spda' is not an attention implementation "
                       r"transformers knows; one of eager, .*sdpa"):
        _cfg(model_dir, "model.attn_implementation=spda")
    with pytest.raises(ConfigError, match="flex_attention needs scaling.use_gpu=true"):
        _cfg(model_dir, "model.attn_implementation=flex_attention")


def test_a_kernel_transformers_cannot_load_is_a_config_error_of_the_plan(tmp_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: transformers would accept flash_attention_2")
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2: transformers refuses it"):
        planner.plan(_cfg(_model_dir(tmp_path, **TINY), "model.attn_implementation=flash_attention_2"))
