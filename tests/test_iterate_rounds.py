"""Iterate rounds without Ray: each round's single-run config (its pairs, start policy, reference, folder and
MLflow store) and the reference model a run loads."""

import os
from types import SimpleNamespace

import pytest

from mdpo_ray.config import load_config
from mdpo_ray.iterate import store
from mdpo_ray.training.reference import reference_config


@pytest.fixture
def iterate_cfg(tmp_path):
    return lambda *extra: load_config(None, [f"output_dir={tmp_path}", "model.name_or_path=/models/sft",
                                              "data.train=/data/train.jsonl", "iterate.rounds=3", *extra])


def test_a_round_trains_its_saved_pairs_from_its_start_policy_under_its_folder(iterate_cfg):
    from mdpo_ray.launch_rounds import round_config

    cfg = iterate_cfg()
    first, second = round_config(cfg, 0, "/models/sft"), round_config(cfg, 1, "/runs/r0/export")
    location = store.round_location(cfg.run_location, 1)
    assert second.run_location == f"{location}/{cfg.name}-round-1"
    assert second.data.train == f"{location}/{store.PAIRS_FILE}"
    assert first.model.name_or_path == "/models/sft" and second.model.name_or_path == "/runs/r0/export"
    assert first.mlflow_uri == second.mlflow_uri == cfg.mlflow_uri  # one store, not one per round folder
    assert first.iterate.rounds == second.iterate.rounds == 0  # a round is a single run
    assert (second.loss, second.optim, second.seed) == (cfg.loss, cfg.optim, cfg.seed)


@pytest.mark.parametrize(("reference", "round_1_reference"), [("previous", "/runs/r0/export"),
                                                                ("initial", "/models/sft")])
def test_the_round_reference_is_its_start_policy_or_the_initial_model(iterate_cfg, reference, round_1_reference):
    from mdpo_ray.launch_rounds import round_config

    cfg = iterate_cfg(f"iterate.reference={reference}")
    assert reference_config(round_config(cfg, 0, "/models/sft")).name_or_path == "/models/sft"
    assert reference_config(round_config(cfg, 1, "/runs/r0/export")).name_or_path == round_1_reference



def test_a_lora_iterate_run_may_export_an_adapter_and_its_rounds_then_export_both(iterate_cfg):
    """Each round starts from the previous round's merged model and keeps its adapter for the run's own export,
    the rounds' adapters stacked (test_iterate_adapters)."""
    from mdpo_ray.launch_rounds import round_config

    cfg = iterate_cfg("model.lora.r=4", "export.lora=adapter")  # refused before: rounds chained merged models only
    assert cfg.export.lora == "adapter"
    for r, start in ((0, "/models/sft"), (1, "/runs/r0/export")):
        assert round_config(cfg, r, start).export.lora == "both"
    assert round_config(iterate_cfg("model.lora.r=4"), 1, "/runs/r0/export").export.lora == "merged"
    assert round_config(iterate_cfg("export.lora=adapter"), 1, "/runs/r0/export").export.lora == "adapter"  # no LoRA

def test_a_configured_reference_is_loaded_instead_of_the_policy(tmp_path):
    cfg = load_config(None, ["model.name_or_path=/models/policy", "model.reference=/models/ref"])
    loaded = reference_config(cfg)
    assert loaded.name_or_path == "/models/ref" and loaded.reference is None
    assert loaded.tokenizer == cfg.model.tokenizer and reference_config(load_config()).name_or_path == "builtin:arith"


def test_a_finished_round_is_recorded_last_and_read_back(tmp_path):
    location = store.round_location(str(tmp_path), 0)
    assert store.load_done(location) is None
    store.save_done(location, {"export": "/x/export", "metrics": {"eval/answer_accuracy": 0.5}})
    assert store.load_done(location) == {"export": "/x/export", "metrics": {"eval/answer_accuracy": 0.5}}


@pytest.fixture
def rounds(iterate_cfg, monkeypatch):
    """launch_rounds._run_round with sampling and training replaced by recorders: what a rerun does again."""
    from mdpo_ray import launch, launch_rounds
    from mdpo_ray.iterate.verify import Pairing

    calls = {"sampled": 0, "trained": []}
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    def sample(cfg, start_model, rows, verifier, r):
        calls["sampled"] += 1
        return Pairing(pairs if calls.get("pairs", True) else [], 1, 0, 4, 2)

    def train(round_cfg, *, tags, callbacks):
        calls["trained"].append((round_cfg.name, round_cfg.model.name_or_path, tags))
        return launch.RunSummary(config=round_cfg, mlflow_run_id="child", metrics={"eval/answer_accuracy": 0.25,
                                                                                   "step": 2},
                                 checkpoint=None, export_dir=round_cfg.run_dir / "export")

    monkeypatch.setattr(launch_rounds, "sample_pairs", sample)
    monkeypatch.setattr(launch, "train", train)
    monkeypatch.setattr("mdpo_ray.tracking.mlflow_runs.log_metrics", lambda *a, **k: None)
    cfg = iterate_cfg()
    return calls, lambda r, start: launch_rounds._run_round(cfg, r, start, [], None, "parent", None)


def test_a_rerun_reads_saved_pairs_back_and_skips_a_finished_round(rounds):
    calls, run_round = rounds
    first = run_round(0, "/models/sft")
    assert calls["sampled"] == 1 and calls["trained"][0][1] == "/models/sft"
    assert calls["trained"][0][2] == {"mlflow.parentRunId": "parent", "mdpo.iterate_round": "0"}
    assert first["export"].endswith("round_000/minor-dpo-arith-round-0/export")
    assert run_round(0, "/models/sft") == first and calls["sampled"] == 1 and len(calls["trained"]) == 1  # done

    location = store.round_location(first["export"].split("/iterate/")[0], 1)
    run_round(1, first["export"])
    os.remove(os.path.join(location, store.DONE_FILE))  # killed during training: pairs saved, no done.json
    again = run_round(1, first["export"])
    assert calls["sampled"] == 2 and len(calls["trained"]) == 3  # trained again (Ray Train resumes), not resampled
    assert again["start_model"] == first["export"]


def test_a_round_without_a_pair_is_an_error_naming_the_keys(rounds):
    from mdpo_ray.config import ConfigError

    calls, run_round = rounds
    calls["pairs"] = False
    with pytest.raises(ConfigError, match="iterate.samples_per_prompt or iterate.temperature"):
        run_round(0, "/models/sft")
    assert calls["trained"] == []


def test_actors_sample_contiguous_shares_in_prompt_order_each_seeded_apart(monkeypatch):
    from mdpo_ray import launch_rounds

    seeds = []

    def actor(name):
        def remote(prompts, *, n, temperature, seed):
            seeds.append(seed)
            return [[f"{name}:{p}"] * n for p in prompts]
        return SimpleNamespace(sample=SimpleNamespace(remote=remote))

    monkeypatch.setattr(launch_rounds.ray, "get", lambda futures: futures)  # the fakes return values, not refs
    generator = launch_rounds.ActorGenerator([actor("a"), actor("b"), actor("c")])
    out = generator.sample(["p0", "p1", "p2", "p3", "p4"], n=2, temperature=1.0, seed=7)
    assert out == [["a:p0"] * 2, ["a:p1"] * 2, ["b:p2"] * 2, ["b:p3"] * 2, ["c:p4"] * 2]
    assert len(set(seeds)) == 3
    assert generator.sample(["p0"], n=1, temperature=1.0, seed=7) == [["a:p0"]]  # idle actors get nothing


@pytest.mark.parametrize("use_gpu", [False, True])
def test_a_round_starts_one_sampler_per_worker_with_a_workers_resources(iterate_cfg, monkeypatch, use_gpu):
    """On GPUs the samplers are the same actors, each holding a worker's GPU (and loading the policy onto it),
    restarted once if lost; outside the caller's placement group, where a Tune trial would starve them."""
    from mdpo_ray import launch_rounds

    started = []

    class Sampler:
        @staticmethod
        def options(**options):
            return SimpleNamespace(remote=lambda model, **kwargs: started.append((options, model, kwargs)) or "actor")

    monkeypatch.setattr(launch_rounds, "Sampler", Sampler)
    cfg = iterate_cfg("scaling.num_workers=2", "scaling.cpus_per_worker=4", f"scaling.use_gpu={use_gpu}",
                      "scaling.gpus_per_worker=1", "eval.max_new_tokens=7", "model.reference=/models/ref")
    assert launch_rounds.start_samplers(cfg, "/runs/round_0/export") == ["actor"] * 2
    options, model, kwargs = started[0]
    assert (options["num_cpus"], options["num_gpus"]) == (4, 1 if use_gpu else 0)
    assert (options["max_restarts"], options["max_task_retries"]) == (1, 1)
    assert options["scheduling_strategy"].placement_group is None
    assert model["name_or_path"] == "/runs/round_0/export" and model["reference"] is None  # samplers need no reference
    assert kwargs == {"use_gpu": use_gpu, "mixed_precision": "auto", "max_new_tokens": 7,
                      "batch_size": cfg.eval.generation_batch_size}


def test_samplers_load_the_policy_in_the_dtype_training_computes_in(tiny_task, monkeypatch):
    """bf16 on a GPU with bf16 units (under `auto` or `bf16`), fp32 on CPU and on GPUs that only emulate bf16:
    a 7B sampler then holds 14 GB, not 28."""
    import torch

    from mdpo_ray.config import ModelConfig
    from mdpo_ray.training.distributed import compute_dtype
    from mdpo_ray.training.model import load_causal_lm

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("auto", cpu) == compute_dtype("fp32", cpu) == torch.float32
    for native, auto in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, native=native: native)
        assert compute_dtype("auto", gpu) == auto and compute_dtype("bf16", gpu) == torch.bfloat16
        assert compute_dtype("fp32", gpu) == torch.float32
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_task["model"])), trainable=False, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_summary_says_rounds_and_compares_round_0_start_with_the_last_round(iterate_cfg, tmp_path):
    from mdpo_ray import launch

    summary = launch.RunSummary(config=iterate_cfg(), mlflow_run_id="parent", checkpoint=None, export_dir=tmp_path,
                                metrics={"step": 20, "eval_start/answer_accuracy": 0.4, "eval/answer_accuracy": 0.5})
    text = launch.describe(summary)
    assert "3 iterate rounds of 20 steps" in text
    assert "answer accuracy (greedy)           0.4000     0.5000" in text


def test_model_reference_is_the_frozen_model_the_losses_compare_with(tiny_task, tiny_run_overrides, tmp_path):
    """iterate.reference=initial's mechanism: with model.reference = X, the step-0 reference log-probs are X's
    policy log-probs on the same first batch (a run from X), resident or precomputed, and differ from the policy's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mdpo_ray.training.train_loop import Worker, train

    other = AutoModelForCausalLM.from_pretrained(tiny_task["model"])
    torch.manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn_like(param))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_task["model"]).save_pretrained(tmp_path / "other")

    def step_zero(*extra):
        logged = {}
        sink = type("Sink", (), {"log": lambda self, m, step: logged.setdefault(step, {}).update(m),
                                 "tag": lambda self, k, v: None, "log_model": lambda self, d: None})()
        cfg = load_config(None, [*tiny_run_overrides, "scaling.num_workers=1", "optim.max_steps=1",
                                 "data.generation_eval=null", *extra])
        train(cfg, Worker(sink=sink))
        return logged[0]

    from_other = step_zero(f"model.name_or_path={tmp_path / 'other'}", "name=from-other")
    for mode in ("resident", "precompute"):
        against_other = step_zero(f"model.reference={tmp_path / 'other'}", f"reference={mode}", f"name=ref-{mode}")
        assert against_other["logps/ref_chosen"] == pytest.approx(from_other["logps/chosen"], rel=1e-5), mode
        assert against_other["logps/ref_rejected"] == pytest.approx(from_other["logps/rejected"], rel=1e-5), mode
        assert abs(against_other["logps/chosen"] - against_other["logps/ref_chosen"]) > 1e-3, mode
