"""What bounds the executed-FLOP efficiency (HFU) of mdpo-ray's step on vs_trl.py's fixed-length benchmark.

    python benchmarks/step_bound.py                  # vs_trl.py's model and pairs, its `minor_dpo` config
    python benchmarks/step_bound.py --config minor_dpo_precompute --steps 6
    python benchmarks/step_bound.py --hidden 1024 --intermediate 2752 --heads 16   # a wider model, same data

HFU is the matmul FLOPs a step runs, per second, over the device's n x n matmul rate (vs_trl.py). It is the
product of two fractions, which this script measures for the in-process step (the code a Ray worker runs):

    HFU = (share of the step's time spent in matmuls) x (the matmuls' own rate / the n x n rate)

1. torch.profiler over `--steps` steps after a warm-up splits the step's time by what ran: matmuls
   (aten::mm, addmm, bmm), attention (sdpa, forward and backward), the scored rows' log-softmax, the
   optimizer, FSDP2's bookkeeping, and the rest (elementwise ops, copies, reductions). Self time on the
   calling thread, so the parts add up to the profiled wall time.
2. The matmul FLOPs of those steps (the profiler's count, from the ops' shapes) over the matmuls' time: the
   rate the step's matmuls reach inside the step.
3. Each distinct matmul shape of the step timed alone, contiguous: the rate this model's matmuls reach on
   this machine at best. Their FLOPs over their summed alone-times is the matmul ceiling; with nothing but
   matmuls in the step, HFU could not exceed it.

It prints the three and the table by part. Profiling adds some time per op; the step time with and without
the profiler is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # benchmarks/, this script's own folder: the same model, pairs and run config

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
PARTS = [  # (part, how an op's name tells it), first match wins
    ("matmul", lambda name: name in MATMUL),
    ("attention (sdpa)", lambda name: "scaled_dot_product" in name or "flash_attention" in name),
    ("log-softmax of the scored rows", lambda name: "log_softmax" in name),
    ("FSDP2 and distributed", lambda name: "FSDP" in name or "c10d" in name or "fsdp" in name),
    ("copies and layout (copy_, cat, contiguous, to)",
     lambda name: name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy",
                           "aten::index_select", "aten::embedding_dense_backward", "aten::gather")),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other option is vs_trl.py's, with its defaults: the model (--hidden, "
                                "--intermediate, --heads, --layers, --vocab), the pairs (--batch, --shots), --threads "
                                "and --matmul-size.")
    p.add_argument("--config", default="minor_dpo", choices=["minor_dpo", "minor_dpo_precompute", "dpo"],
                   help="a vs_trl.py in-process config")
    p.add_argument("--steps", type=int, default=4, help="profiled steps, after --warmup-steps")
    p.add_argument("--warmup-steps", type=int, default=6)
    p.add_argument("--per-tensor-adamw", action="store_true", help="AdamW(fused=False) in the loop, as before "
                   "2026-12-07: the optimizer's share without PyTorch's fused kernel")
    return p


class _Window:
    """The loop's metric sink: a log point every step starts the profiler after the warm-up, stops it after
    the profiled steps, and keeps each step's wall time."""

    def __init__(self, prof, start: int, stop: int) -> None:
        self.prof, self.start, self.stop = prof, start, stop
        self.times: dict[int, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.times[step] = time.perf_counter()
        if step == self.start:
            self.prof.start()
        elif step == self.stop:
            self.prof.stop()

    def tag(self, key: str, value: str) -> None:
        pass

    def close(self) -> None:
        pass


def _part(event) -> str:
    """The part an op's self time counts to: the optimizer's (any op under its step or zero_grad), else by name."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
            return "optimizer (AdamW, zero_grad)"
        parent = parent.cpu_parent
    return next((part for part, match in PARTS if match(event.name)), "other (elementwise, reductions, norms)")


def _alone_seconds(shapes: list[list[int]], name: str, torch) -> float:
    """One matmul of these input shapes, contiguous, timed alone: the median of 7 rounds of 10 back-to-back
    calls (single calls of a millisecond time the thread pool waking up), after a warm-up round."""
    if name == "aten::addmm":
        bias, a, b = (torch.randn(s) for s in shapes[:3])
        run = lambda: torch.addmm(bias, a, b)
    else:
        a, b = torch.randn(shapes[0]), torch.randn(shapes[1])
        run = (lambda: torch.bmm(a, b)) if name == "aten::bmm" else (lambda: torch.mm(a, b))
    times = []
    for _ in range(8):
        started = time.perf_counter()
        for _ in range(10):
            run()
        times.append((time.perf_counter() - started) / 10)
    return statistics.median(times[1:])


def main() -> None:
    args, rest = _parser().parse_known_args()
    bench = vs_trl._resolve(vs_trl._parser().parse_args(rest))  # the model, pairs and threads: vs_trl.py's options
    import torch
    import torch.profiler

    from mdpo_ray.training.train_loop import Worker, train

    torch.set_num_threads(bench.threads)
    if args.per_tensor_adamw:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda *a, **k: adamw(*a, **k | {"fused": False})
    bench.workdir = Path(tempfile.mkdtemp(prefix="mdpo-step-bound-"))
    bench.window, bench.warmup, bench.windows = 1, args.warmup_steps, args.steps + 1  # a log point every step
    assets = vs_trl.prepare(bench, bench.workdir)
    n = bench.matmul_size or 2048  # vs_trl.py's CPU default
    rate = vs_trl.matmul_rate("cpu", n)
    _, loss, reference = vs_trl.CONFIGS[args.config]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                  with_flops=True)
    first, last = args.warmup_steps, args.warmup_steps + args.steps
    window = _Window(prof, first, last)
    train(vs_trl._run_config(bench, assets, args.config, loss, reference), Worker(sink=window))

    step_s = (window.times[last] - window.times[first]) / args.steps
    plain = [window.times[s] - window.times[s - 1] for s in range(2, first + 1)]
    by_part, by_op = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.name.startswith(("Optimizer.", "ProfilerStep")):  # regions: their ops count on their own
            continue
        by_part[_part(event)] += event.self_cpu_time_total / 1e6
        by_op[event.name] += event.self_cpu_time_total / 1e6
    mm_flops, mm_seconds, shapes, other_shapes = 0.0, 0.0, [], []
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        if event.key not in MATMUL:
            other_shapes.append((seconds, event.key, event.input_shapes, event.count))
        if event.key in MATMUL:
            mm_flops += event.flops
            mm_seconds += seconds
            shapes.append((event.key, event.input_shapes, event.count, event.flops))
    profiled = sum(by_part.values())
    others = sorted(((op, s) for op, s in by_op.items() if op not in MATMUL), key=lambda kv: -kv[1])[:12]
    alone_seconds = sum(count * _alone_seconds(shape, name, torch) for name, shape, count, _ in shapes)

    print(f"config {args.config} (vs_trl.py's model and pairs: hidden {bench.hidden}, {bench.layers} layers, vocab "
          f"{bench.vocab}; batch {bench.batch} pairs of ~{assets['tokens_per_pair'] / 2:.0f} tokens a sequence), "
          f"fp32, {bench.threads} torch threads" + (", per-tensor AdamW" if args.per_tensor_adamw else ""))
    print(f"{n}x{n} matmul rate: {rate / 1e9:.1f} GFLOP/s")
    print(f"step: {step_s:.3f} s profiled ({args.steps} steps), {statistics.median(plain):.3f} s without the "
          f"profiler (median of the warm-up's steps 2-{first})")
    print(f"\n{'part of the profiled steps':<52}{'seconds':>9}{'share':>8}")
    for part, seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
        print(f"{part:<52}{seconds:>9.2f}{seconds / profiled:>8.0%}")
    print(f"{'all ops (self time on the calling thread)':<52}{profiled:>9.2f}")
    print("the largest ops besides the matmuls: " + ", ".join(f"{op.removeprefix('aten::')} {s / profiled:.1%}"
                                                              for op, s in others))
    share, inside, ceiling = mm_seconds / profiled, mm_flops / mm_seconds, mm_flops / alone_seconds
    print(f"\nmatmul FLOPs per step: {mm_flops / args.steps / 1e9:.1f} GFLOP in {sum(c for *_, c, _ in shapes)} "
          f"calls of {len(shapes)} distinct shapes")
    print(f"HFU in the profiled steps: {mm_flops / (step_s * args.steps) / rate:.0%} of the {n}x{n} rate")
    print(f"  = matmul share of the step {share:.0%} x matmul rate inside the step {inside / 1e9:.1f} GFLOP/s "
          f"({inside / rate:.0%} of the {n}x{n} rate)")
    print(f"matmul ceiling, the step's shapes timed alone: {ceiling / 1e9:.1f} GFLOP/s = {ceiling / rate:.0%} of the "
          f"{n}x{n} rate: HFU's bound with every other op taking no time")
    print("\nthe largest ops besides the matmuls, by input shapes:")
    for seconds, name, shape, count in sorted(other_shapes, key=lambda o: -o[0])[:10]:
        print(f"  {name.removeprefix('aten::'):<48} {shape!s:<52} x{count:<5} {seconds / profiled:>6.1%}")
    print("\nthe step's matmul shapes by FLOPs (input shapes; rate inside the step is not split per shape):")
    for name, shape, count, flops in sorted(shapes, key=lambda s: -s[3])[:8]:
        alone = _alone_seconds(shape, name, torch)
        print(f"  {name:<12} {shape!s:<44} x{count:<5} {flops / count / alone / 1e9:>6.1f} GFLOP/s alone")


if __name__ == "__main__":
    main()
