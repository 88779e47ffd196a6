"""Memory-for-compute trades must not change the experiment: gradient accumulation, activation
checkpointing and CPU offload give the losses and parameters of a plain run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mdpo_ray.config import load_config
from mdpo_ray.training import distributed, train_loop
from mdpo_ray.training.train_loop import Worker, train

# Runs of the loop on rank argv[1] of argv[2] gloo ranks, one per JSON list of overrides in argv[4]; rank 0
# writes what each logged. One process pair for all runs: starting one costs more than a tiny run.
_RANKS = r"""
import gc, json, sys

import torch.distributed as dist

from mdpo_ray.config import load_config
from mdpo_ray.training.train_loop import Worker, train

rank, ranks, store, runs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank, world_size=ranks)
logged = []
class Sink:
    def log(self, metrics, step):
        logged[-1].setdefault(step, {}).update(metrics)
    def tag(self, key, value):
        pass
for overrides in runs:
    logged.append({})
    train(load_config(None, overrides), Worker(sink=Sink()))
if rank == 0:
    print("LOGGED" + json.dumps(logged))
gc.collect()  # FSDP2 state freed while the group lives (see test_distributed)
dist.barrier()
dist.destroy_process_group()
"""


class Recorder:
    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}

    def log(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def tag(self, key, value):
        pass


def _overrides(tiny_run_overrides, name: str) -> list[str]:
    # No greedy decoding (not what these tests are about), three optimizer steps, fp32 on CPU. The learning
    # rate is a realistic one: at the fixture's 1e-2 each step moves the random-init weights by more than
    # their size, and AdamW's near-sign update of a near-zero gradient element turns float summation order
    # (one forward vs micro-batches) into 1e-5 of a tensor.
    return [*tiny_run_overrides, "data.generation_eval=null", "optim.max_steps=3", f"name={name}",
            "scaling.mixed_precision=fp32", "optim.lr=1e-4"]


def _run_in_process(overrides: list[str]):
    cfg = load_config(None, [*overrides, "scaling.num_workers=1"])
    recorder = Recorder()
    train(cfg, Worker(sink=recorder))
    return cfg, recorder.logged


def _run_ranks(runs: list[list[str]], ranks: int, tmp_path: Path) -> list[dict[int, dict[str, float]]]:
    runs = json.dumps([[*overrides, f"scaling.num_workers={ranks}"] for overrides in runs])
    procs = [subprocess.Popen([sys.executable, "-c", _RANKS, str(r), str(ranks), str(tmp_path / "store"), runs],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-3000:] for _, err in outs]
    logged = json.loads(outs[0][0].split("LOGGED", 1)[1])
    return [{int(step): metrics for step, metrics in run.items()} for run in logged]


def _exported(cfg_or_dir) -> dict[str, torch.Tensor]:
    path = cfg_or_dir if isinstance(cfg_or_dir, Path) else cfg_or_dir.run_dir / "export"
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_same_run(a: dict, b: dict, params_a: dict, params_b: dict, initial: dict) -> None:
    """The logged step metrics agree (grad_norm too: a loss normalised per micro-batch would scale it), and
    every parameter tensor agrees to 1e-6 of its norm, while the steps moved it by far more than that."""
    for step in (1, 2, 3):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert a[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert params_a.keys() == params_b.keys() == initial.keys()
    for key, value in params_a.items():
        moved, apart = float((value - initial[key]).norm()), float((params_b[key] - value).norm())
        assert apart <= 1e-6 * float(value.norm()) < moved / 10, (key, apart, moved)


def test_accumulated_micro_batches_give_the_step_of_one_forward(tiny_task, tiny_run_overrides, monkeypatch):
    """batch 8 in one forward vs 4 micro-batches of 2, and vs forwards cut by a token budget: the gradient of the
    summed micro-batch losses over the whole slice is that of the mean loss, so the parameters after 3 AdamW
    steps agree to 1e-6."""
    forwards = []
    original = train_loop.concatenated_logps
    monkeypatch.setattr(train_loop, "concatenated_logps",
                        lambda model, batch, **kw: forwards.append(batch["loss_mask"].shape[0]) or original(
                            model, batch, **kw))
    base = _overrides(tiny_run_overrides, "one-forward")
    cfg_one, one = _run_in_process([*base, "optim.micro_batch_size=8"])
    assert forwards == [16] * 3  # 8 pairs, chosen + rejected sequences (packed, in fewer rows)
    forwards.clear()
    cfg_acc, acc = _run_in_process([*_overrides(tiny_run_overrides, "accumulated"), "optim.micro_batch_size=2"])
    assert forwards == [4] * 12  # 4 micro-batches of 2 pairs a step
    _assert_same_run(one, acc, _exported(cfg_one), _exported(cfg_acc), _exported(tiny_task["model"]))
    assert acc[3]["eval/loss"] == pytest.approx(one[3]["eval/loss"], rel=1e-5)

    # Forwards of at most 256 tokens: 2 to 3 of these pairs (66-124 tokens each, none cut at 64 a sequence).
    forwards.clear()
    cfg_tok, tok = _run_in_process([*_overrides(tiny_run_overrides, "budget"), "optim.micro_batch_tokens=256",
                                    "data.max_length=64"])
    assert len(forwards) > 6 and len(set(forwards)) > 1 and sum(forwards) == 16 * 3, forwards
    _assert_same_run(one, tok, _exported(cfg_one), _exported(cfg_tok), _exported(tiny_task["model"]))


@pytest.mark.slow
def test_accumulation_across_two_ranks_matches_one_forward_per_rank(tiny_task, tiny_run_overrides, tmp_path):
    """2 gloo ranks, 4 pairs each: one forward per rank vs 2 micro-batches per rank, the non-final one
    without the gradient reduce-scatter (and with one, `optim.sync_every_micro_batch`), and forwards cut by a
    token budget (both ranks run as many, or FSDP's collectives would hang)."""
    output_dir = Path(next(o for o in tiny_run_overrides if o.startswith("output_dir=")).split("=", 1)[1])
    runs = {"plain": [], "accumulated": ["optim.micro_batch_size=2"],
            "synced": ["optim.micro_batch_size=2", "optim.sync_every_micro_batch=true"],
            "budget": ["optim.micro_batch_tokens=200", "data.max_length=64"]}
    logged = dict(zip(runs, _run_ranks([_overrides(tiny_run_overrides, name) + extra for name, extra in runs.items()],
                                       2, tmp_path), strict=True))
    params = {name: _exported(output_dir / name / "export") for name in runs}
    for name in ("accumulated", "synced", "budget"):
        _assert_same_run(logged["plain"], logged[name], params["plain"], params[name], _exported(tiny_task["model"]))


def test_a_micro_batch_that_does_not_divide_the_worker_batch_exits_2_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdpo_ray", "train", "--set", "optim.batch_size=8",
                           "--set", "optim.micro_batch_size=3"], capture_output=True, text=True, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 2
    assert "optim.micro_batch_size (3)" in proc.stderr and "optim.batch_size (8)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses_and_gradients(tiny_task, tiny_run_overrides, monkeypatch):
    """Each decoder block is checkpointed (non-reentrant, under FSDP2), fully or selectively, beside the
    head-on-completion hook and a frozen resident reference; recomputing a block's forward (or its cheap ops)
    in backward changes no number."""
    wrapped = []
    original = distributed.shard_model

    def spy(model, mesh, mp_policy, **kwargs):
        out = original(model, mesh, mp_policy, **kwargs)
        wrapped.append((kwargs.get("checkpoint", False),
                        sum(hasattr(m, "_checkpoint_wrapped_module") for m in out.modules())))
        return out

    monkeypatch.setattr(distributed, "shard_model", spy)
    cfg_plain, plain = _run_in_process(_overrides(tiny_run_overrides, "plain"))
    cfg_ac, ac = _run_in_process([*_overrides(tiny_run_overrides, "checkpointed"),
                                  "scaling.activation_checkpointing=true"])
    cfg_sel, sel = _run_in_process([*_overrides(tiny_run_overrides, "selective"),
                                    "scaling.activation_checkpointing=selective"])
    layers = AutoModelForCausalLM.from_pretrained(tiny_task["model"]).config.num_hidden_layers
    # (mode, wrapped blocks) of the policy, then the reference, in each run
    assert wrapped == [(False, 0), (False, 0), (True, layers), (False, 0), ("selective", layers), (False, 0)]
    _assert_same_run(plain, ac, _exported(cfg_plain), _exported(cfg_ac), _exported(tiny_task["model"]))
    _assert_same_run(plain, sel, _exported(cfg_plain), _exported(cfg_sel), _exported(tiny_task["model"]))


@pytest.mark.slow
def test_cpu_offload_applies_fsdp2s_policy_and_changes_no_number(tiny_task, tiny_run_overrides, monkeypatch):
    from torch.distributed.fsdp import CPUOffloadPolicy

    policies = []
    original = distributed.fully_shard
    monkeypatch.setattr(distributed, "fully_shard",
                        lambda module, **kw: policies.append(type(kw["offload_policy"])) or original(module, **kw))
    cfg_plain, plain = _run_in_process(_overrides(tiny_run_overrides, "plain"))
    plain_policies = list(policies)
    policies.clear()
    cfg_off, off = _run_in_process([*_overrides(tiny_run_overrides, "offloaded"), "scaling.cpu_offload=true"])
    assert CPUOffloadPolicy not in plain_policies
    shards = len(policies) // 2  # the policy's blocks + root, then the frozen reference's
    assert set(policies[:shards]) == {CPUOffloadPolicy}  # the policy: every block and the root
    assert CPUOffloadPolicy not in policies[shards:]  # the frozen reference stays where it computes
    _assert_same_run(plain, off, _exported(cfg_plain), _exported(cfg_off), _exported(tiny_task["model"]))


@pytest.mark.slow
def test_a_run_resumes_with_checkpointing_and_accumulation_turned_on(tiny_run_overrides, tmp_path):
    """The fix for a run that ran out of memory: turn on checkpointing and micro-batches, and resume it from
    its last checkpoint. The wrapped blocks load the plain blocks' checkpoint, and the rest of the run is the
    one it would have been."""
    import shutil

    base = [*_overrides(tiny_run_overrides, "straight"), "optim.max_steps=4", "checkpoint.every_steps=2"]
    _, straight = _run_in_process(base)
    kept = tmp_path / "kept"

    class Keep(Recorder):
        def report(self, metrics, checkpoint_dir, step):
            if checkpoint_dir is not None and step == 2:
                shutil.copytree(checkpoint_dir, kept)

    first = Keep()
    train(load_config(None, [*base, "name=interrupted", "optim.max_steps=2", "scaling.num_workers=1"]),
          Worker(sink=first, report=first.report))
    resumed = Recorder()
    train(load_config(None, [*base, "name=interrupted", "scaling.num_workers=1", "optim.micro_batch_size=2",
                             "scaling.activation_checkpointing=true"]), Worker(sink=resumed, restore_dir=kept))
    assert sorted(resumed.logged) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert resumed.logged[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-6), (step, key)
