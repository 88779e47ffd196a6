"""Planned against measured per-rank peak memory of the training step, on CPU (or one GPU).

Each configuration runs mdpo_ray.training.train_loop.train in a fresh child process (a one-rank FSDP2 group, the
code a Ray worker runs, so activation checkpointing, LoRA and accumulation go through the real code once
they exist) for two steps; step 2 (AdamW's state exists by then) is measured at the tensor level with
torch's MemTracker (torch.distributed._tools.mem_tracker: every live tensor storage, FSDP2's resized
ones included), entered at the start of step 2 with every tensor alive then registered. The planner
(mdpo_ray.planning.planner) plans the same config; the ratio is planned / measured. Peak RSS of the child is
printed for reference (it includes the interpreter, the libraries and the allocator's slack; the child
gets the allocator settings a CPU-only Ray worker gets).

The models are Llama-shaped, random-init, saved with save_pretrained and loaded back by the real
loading code; the pairs are synthetic text of exact token lengths (character tokenizer, one token a
character): prompt (1 - f) x max_length, completion f x max_length (rejected 4 tokens shorter, so a batch
holds padding as real data does), f = --completion-fraction.

    python benchmarks/memory.py                      # every configuration, then plan_examples.py (~2-10 min)
    python benchmarks/memory.py --configs s256 l512  # a subset
    python benchmarks/memory.py --device cuda        # bf16 on one GPU: max_memory_allocated over step 2
                                                     # (and max_memory_reserved beside it); not yet run

A configuration whose feature the built policy does not show (LoRA adapters, checkpoint wrappers) or
whose step runs more than one micro-batch in a forward (no accumulation) prints "skipped: not
implemented" instead of a figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from mdpo_ray.planning.footprint import fmt_count

MODELS = {  # name: LlamaConfig keywords (vocab 32000 unless given)
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1000),  # tests/test_benchmark.py
    "s": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, tie_word_embeddings=False),  # 44.6M
    "l": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4, tie_word_embeddings=True),  # 100.1M
}
CONFIGS = {  # name: (model, max_length, pairs per step, --set overrides)
    "tiny64": ("tiny", 64, 2, []),
    "s256": ("s", 256, 2, []),
    "s2048_precompute": ("s", 2048, 1, ["reference=precompute"]),
    "s512_accum4": ("s", 512, 4, ["optim.micro_batch_size=1"]),
    "s512": ("s", 512, 2, []),
    "s512_ckpt": ("s", 512, 2, ["scaling.activation_checkpointing=true"]),
    "s1024": ("s", 1024, 2, []),
    "s1024_padded": ("s", 1024, 2, ["data.padding_free=false"]),  # the others pack (data.padding_free: auto)
    "s1024_ckpt": ("s", 1024, 2, ["scaling.activation_checkpointing=true"]),
    "s1024_selective": ("s", 1024, 2, ["scaling.activation_checkpointing=selective"]),
    "s2048_ckpt_precompute": ("s", 2048, 1, ["reference=precompute", "scaling.activation_checkpointing=true"]),
    "s512_lora": ("s", 512, 2, ["model.lora.r=16"]),
    "l512": ("l", 512, 1, []),
    "l2048": ("l", 2048, 1, []),
    "l1024_ckpt_lora": ("l", 1024, 1, ["scaling.activation_checkpointing=true", "model.lora.r=16"]),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "tiny64"], choices=list(CONFIGS))
    p.add_argument("--completion-fraction", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: bf16, measured by torch.cuda.max_memory_allocated over step 2 (not run on CPU)")
    p.add_argument("--no-examples", action="store_true", help="skip plan_examples.py's verdicts at the end")
    p.add_argument("--phases", action="store_true", help="print the tracked memory at each point of step 2")
    p.add_argument("--workdir", help="keep models and data here (default: a temp dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mdpo-memory-"))
    how = "MemTracker" if args.device == "cpu" else "max_memory_allocated"
    print(f"per-rank peak, planned (mdpo_ray.planning.planner) vs measured ({how}, step 2); {args.device} "
          f"({'fp32' if args.device == 'cpu' else 'bf16'}), 1 rank, "
          f"completion fraction {args.completion_fraction:g}, {args.threads} threads; {_machine()}")
    header = (f"{'config':<18} {'params':>7} {'T':>5} {'micro':>5} {'accum':>5} {'ckpt':>4} {'lora':>4} "
              f"{'planned GiB':>11} {'measured GiB':>12} {'ratio':>6} {'peak at':>8} {'RSS GiB' if args.device == 'cpu' else 'reserved':>8} {'plan+ovh':>8}")
    print(header)
    ratios = []
    for name in args.configs:
        model, seq, batch, overrides = CONFIGS[name]
        model_dir = _model(workdir, model)
        data = _pairs(workdir, seq, batch, args.completion_fraction)
        overrides = [f"model.name_or_path={model_dir}", f"data.train={data}", f"data.max_length={seq}",
                     f"optim.batch_size={batch}", f"output_dir={workdir / 'runs'}", *overrides]
        started = time.perf_counter()
        result = _run_child(overrides, args)
        flags = _flags(overrides)
        if "skipped" in result:
            print(f"{name:<18} skipped: {result['skipped']}")
            continue
        ratios.append(result["planned"] / result["measured"])
        print(f"{name:<18} {fmt_count(result['params']):>7} {seq:>5} {flags['micro']:>5} {flags['accum']:>5} "
              f"{flags['ckpt']:>4} {flags['lora']:>4} {result['planned'] / 2**30:>11.2f} "
              f"{result['measured'] / 2**30:>12.2f} {result['planned'] / result['measured']:>6.2f} "
              f"{result['moment']:>8} {result['rss'] / 2**30:>8.2f} {result['planned_total'] / 2**30:>8.2f}"
              f"   ({time.perf_counter() - started:.0f} s: setup, step 1, tracked step 2 "
              f"{', '.join(f'{t:.0f}' for t in result['seconds'])} s; at the peak: {_categories(result['categories'])})")
    if ratios:
        worst = max(ratios, key=lambda r: abs(r - 1))
        print(f"planned / measured: {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} configurations; "
              f"{'every one' if abs(worst - 1) <= 0.15 else 'NOT every one'} within 15%")
    if not args.no_examples:
        from plan_examples import print_examples  # beside this file

        print_examples()


def _machine() -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent).stdout.strip()
    return f"{time.strftime('%Y-%m-%d')}, {cpu or platform.machine()}, torch {torch.__version__}, commit {commit or '?'}"


def _flags(overrides: list[str]) -> dict[str, str]:
    from mdpo_ray.config import load_config

    cfg = load_config(None, [*overrides, "scaling.num_workers=1"])
    return {"micro": str(cfg.micro_batch_size), "accum": str(cfg.accumulation_steps),
            "ckpt": {True: "on", False: "off", "selective": "sel"}[cfg.scaling.activation_checkpointing],
            "lora": str(cfg.model.lora.r) if cfg.model.lora.r else "off"}


def _categories(snapshot: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in snapshot.items() if k != "Total" and v > 2**24)


def _run_child(overrides: list[str], args) -> dict:
    from mdpo_ray.cluster import CPU_ALLOCATOR_ENV

    job = {"overrides": overrides, "completion_fraction": args.completion_fraction, "threads": args.threads,
           "phases": args.phases, "device": args.device}
    env = os.environ | CPU_ALLOCATOR_ENV | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    for line in proc.stdout.splitlines():
        if args.phases and line.startswith("  "):
            print(line)
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return {"skipped": f"child failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"}


def _model(workdir: Path, name: str) -> Path:
    out = workdir / f"model_{name}"
    if not (out / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from mdpo_ray.task.arith import build_tokenizer

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{"vocab_size": 32000} | MODELS[name])).save_pretrained(out)
        build_tokenizer().save_pretrained(out)
    return out


def _pairs(workdir: Path, seq: int, pairs: int, fraction: float) -> Path:
    """2 x pairs rows (enough for two steps) of exact token lengths: BOS + prompt, completion + EOS."""
    out = workdir / f"pairs_{seq}_{pairs}_{fraction:g}.jsonl"
    completion = round(seq * fraction)
    prompt = seq - completion
    digits = "0123456789"
    rows = [{"prompt": (digits * seq)[: prompt - 1], "chosen": ("1+2=3; " * seq)[: completion - 1],
             "rejected": ("4-1=3; " * seq)[: completion - 5]} for _ in range(2 * pairs)]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


class _Measured(Exception):
    pass


def _peak_tracker():
    """MemTracker's storage accounting without its per-module statistics, which assume one forward of one
    trainable root module per iteration (the step also runs a frozen reference, and accumulates)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs): pass
        def _post_fw_hook(self, module, inputs, outputs): pass
        def _pre_bw_hook(self, module, args): pass
        def _post_bw_hook(self, module, args): pass

    return PeakTracker()


def _child(job: dict) -> dict:
    """Run two steps of the real loop; measure step 2 with MemTracker; plan the same config."""
    import torch

    from mdpo_ray.config import load_config
    from mdpo_ray.planning import planner
    from mdpo_ray.training import distributed, train_loop
    from mdpo_ray.training.train_loop import Worker

    torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    cfg = load_config(None, [*job["overrides"], "scaling.num_workers=1", "optim.max_steps=2", f"scaling.use_gpu={cuda}",
                             "optim.warmup_steps=0", "checkpoint.every_steps=1000", "eval.batch_size=1"])
    plan = planner.plan(cfg, completion_fraction=job["completion_fraction"])
    seen: dict = {"models": [], "optimizers": [], "start": time.perf_counter()}
    tracker = _peak_tracker()

    shard_model, adamw = distributed.shard_model, torch.optim.AdamW

    def recording_shard(model, *a, **k):
        seen["models"].append(weakref.ref(model))  # a strong reference would keep a freed reference model
        return shard_model(model, *a, **k)

    class RecordingAdamW(adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["optimizers"].append(self)

    lr_at = train_loop.lr_at

    def start_at_step_2(optim_cfg, step):
        seen[f"step{step}"] = time.perf_counter()
        if step == 1:  # a feature the built policy does not show stops the run before its slow steps
            missing = _missing_features(cfg, seen["models"][0]())
            if missing:
                raise _Measured(f"not implemented: {missing}")
            seen["models"][0]().register_forward_pre_hook(_stop_unless_accumulating(cfg), with_kwargs=True)
        if step == 2 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif step == 2:
            gc.collect()
            tracker.track_external(*(m() for m in seen["models"] if m() is not None), *seen["optimizers"])
            tracker.track_external(*(t for t in gc.get_objects() if isinstance(t, torch.Tensor) and not t.is_meta))
            tracker.__enter__()
        return lr_at(optim_cfg, step)

    def stop(*a, **k):
        seen["end"] = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
            seen["peak"] = torch.cuda.max_memory_allocated()
        else:
            tracker.__exit__(None, None, None)
        raise _Measured()

    if job.get("phases"):
        for row in plan.rows:
            print(f"  plan: {row.name:<40} {row.bytes / 2**20:9.1f} MiB  {row.when:<8} {'' if row.counted else '(not counted)'}")
        _report_phases(tracker, seen)
    distributed.shard_model, torch.optim.AdamW = recording_shard, RecordingAdamW
    train_loop.lr_at, train_loop._window_metrics = start_at_step_2, stop
    try:
        train_loop.train(cfg, Worker())
    except _Measured as done:
        if str(done):
            return {"skipped": str(done)}
    peak = {"Total": 0} if cuda else tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"params": plan.shape.params, "planned": plan.tensor_bytes, "planned_total": plan.total_bytes,
            "moment": plan.moment, "measured": max(peak["Total"], seen.get("peak", 0)),
            "categories": {str(k).split(".")[-1]: v for k, v in peak.items()},
            "rss": torch.cuda.max_memory_reserved() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": [seen["step1"] - seen["start"], seen["step2"] - seen["step1"], seen["end"] - seen["step2"]]}


def _report_phases(tracker, seen: dict) -> None:
    """--phases: print the tracked total and the peak since the previous mark at each point of the step."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from mdpo_ray.training import reference, train_loop

    cpu = torch.device("cpu")

    def mark(label: str) -> None:
        if tracker._depth:
            current = tracker.get_tracker_snapshot()[cpu]["Total"]
            seen["peak"] = max(seen.get("peak", 0), tracker._peak_mem[cpu])
            print(f"  {label:<28} now {current / 2**20:9.1f} MiB   peak since last {tracker._peak_mem[cpu] / 2**20:9.1f} MiB")
            tracker._peak_mem[cpu] = current

    def wrap(module, name, label):
        original = getattr(module, name)

        def wrapped(*a, **k):
            mark(f"before {label}")
            out = original(*a, **k)
            mark(f"after {label}")
            return out

        setattr(module, name, wrapped)

    wrap(train_loop, "concatenated_logps", "policy forward")
    wrap(reference, "concatenated_logps", "reference forward")
    wrap(train_loop.distributed, "clip_grad_norm", "clip (backward done)")
    register_optimizer_step_pre_hook(lambda *a: mark("before optimizer step"))
    register_optimizer_step_post_hook(lambda *a: mark("after optimizer step"))


def _stop_unless_accumulating(cfg):
    """A forward hook: a policy forward of more than the micro-batch means accumulation has not landed."""
    import torch

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_grad_enabled() and ids is not None and ids.shape[0] > 2 * cfg.micro_batch_size:
            raise _Measured(f"not implemented: accumulation (a forward of {ids.shape[0]} sequences, "
                            f"micro-batch {cfg.micro_batch_size} pairs)")

    return hook


def _missing_features(cfg, policy) -> str:
    """What the config asks for but the built policy does not show (a branch that has not landed yet)."""
    from torch.distributed._composable.contract import _get_registry

    missing = []
    if cfg.model.lora.r and not any("lora_" in name for name, _ in policy.named_parameters()):
        missing.append("model.lora")
    if cfg.scaling.activation_checkpointing and not any(
            type(m).__name__.endswith("CheckpointWrapper") or getattr(m, "gradient_checkpointing", False) is True
            or "checkpoint" in (_get_registry(m) or {}) for m in policy.modules()):
        missing.append("scaling.activation_checkpointing")
    return ", ".join(missing)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
