"""Side by side: TRL's DPOTrainer and mdpo-ray on the same model, pairs, batch, optimizer and precision.

One command measures every configuration, each in a fresh child process (so peak memory is its own),
then prints the table and checks the targets of the performance issue:

    pip install -e '.[bench]'                          # trl, only for this script
    python benchmarks/vs_trl.py                        # CPU, 2 threads, a 19.5M Llama, 8 pairs a step (~16 min)
    python benchmarks/vs_trl.py --configs trl minor_dpo --windows 3      # a quick subset
    python benchmarks/vs_trl.py --profile --configs trl minor_dpo       # + torch.profiler top ops per config
    python benchmarks/vs_trl.py --configs minor_dpo ray_minor_dpo --rounds 5   # Ray's overhead, paired rounds
    python benchmarks/vs_trl.py --varlen --micro-batch 2   # long-tailed lengths (varlen_pairs.py), max_length 2048
    benchmarks/gpu.sh                                  # one GPU, bf16, a ~0.5B Llama

The model is a randomly initialised LlamaForCausalLM (hidden 256, 4 layers, vocab 32k by default)
saved with save_pretrained; the pairs are the built-in arithmetic task's (mdpo_ray/task/arith.py) with
few-shot prompts (--shots solved problems before the question, ~200 tokens a sequence), written to one
JSONL that both sides read, tokenized by the same saved character tokenizer. With --varlen the pairs are
benchmarks/varlen_pairs.py's instead: prompt and completion lengths long-tailed like UltraFeedback's
(median sequence ~470 tokens, up to max_length, 2048 by default), where padding to a batch's longest
sequence costs most.

Configurations:
  trl, trl_precompute          TRL DPOTrainer, sigmoid loss; reference resident / precompute_ref_log_probs
  dpo, minor_dpo               mdpo_ray.training.train_loop.train in this process (one-rank FSDP2 group, the
  dpo_precompute, ...          code a Ray worker runs), resident / precomputed reference
  minor_dpo_full_logits        the same with the LM head on every position (how mdpo-ray ran before)
  ray_minor_dpo                mdpo_ray.launch.train: Ray Train, 1 worker, MLflow tracking
  trl_checkpointing,           both sides with activation checkpointing: TRL's default gradient_checkpointing
  minor_dpo_checkpointing      (DPOConfig's own default) against scaling.activation_checkpointing
  minor_dpo_grouped            data.group_by_length: micro-batches of similar lengths (needs --micro-batch)
  minor_dpo_packed             data.padding_free: each forward's sequences packed without padding
  minor_dpo_grouped_packed     both: micro-batches of similar lengths, each packed (needs --micro-batch)
  minor_dpo_packed_budget      packed forwards of at most --micro-batch-tokens tokens (optim.micro_batch_tokens)
                               in place of --micro-batch pairs: memory bounded by tokens, whatever the lengths
  minor_dpo_packed_budget_selective  the same with selective activation checkpointing (matmul outputs kept)

Speed is steady state: the first --warmup windows of --window steps are warm-up; then --windows windows, each
timed from the end of one window to the end of the next (TRL: a callback's on_step_end; mdpo-ray:
the loop's log point, one per window, in-process or through MLflow's timestamps under Ray), and the
median is reported. With --rounds N every config runs N times, interleaved, and its windows are pooled;
Ray against in-process is then the median of the N paired rounds, since a shared machine's speed drifts
by more than Ray's overhead over the minutes between two runs. tokens/s counts non-padding tokens (the dataset's mean per pair x pairs/s).
Model FLOP/s (MFU) = (6N + 2N if the reference is resident) x tokens/s, N the parameters that multiply
(all but the input embedding table), as a fraction of the measured matmul rate of the device; HFU is
the same fraction for the matmul FLOPs each side actually runs (padding and attention left out on both
sides). `cores` is CPU seconds per second over the timed windows; for Ray, the worker's plus those of
Ray's own processes (GCS, raylet, agents, controller), which share the machine with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import varlen_pairs  # benchmarks/, this script's own folder

CONFIGS = {  # name: (side, loss, reference)
    "trl": ("trl", "sigmoid", "resident"),
    "trl_precompute": ("trl", "sigmoid", "precompute"),
    "dpo": ("ours", "dpo", "resident"),
    "minor_dpo": ("ours", "minor_dpo", "resident"),
    "dpo_precompute": ("ours", "dpo", "precompute"),
    "minor_dpo_precompute": ("ours", "minor_dpo", "precompute"),
    "minor_dpo_full_logits": ("ours_full_logits", "minor_dpo", "resident"),
    "ray_minor_dpo": ("ray", "minor_dpo", "resident"),
    "trl_checkpointing": ("trl", "sigmoid", "resident"),
    "minor_dpo_checkpointing": ("ours", "minor_dpo", "resident"),
    "minor_dpo_grouped": ("ours", "minor_dpo", "resident"),
    "minor_dpo_packed": ("ours", "minor_dpo", "resident"),
    "minor_dpo_grouped_packed": ("ours", "minor_dpo", "resident"),
    "minor_dpo_packed_budget": ("ours", "minor_dpo", "resident"),
    "minor_dpo_packed_budget_selective": ("ours", "minor_dpo", "resident"),
}
DATA_MODES = {"minor_dpo_grouped": {"group_by_length": True}, "minor_dpo_packed": {"padding_free": True},
              "minor_dpo_grouped_packed": {"group_by_length": True, "padding_free": True},
              "minor_dpo_packed_budget": {"padding_free": True}, "minor_dpo_packed_budget_selective": {"padding_free": True}}
BUDGETED = {"minor_dpo_packed_budget", "minor_dpo_packed_budget_selective"}  # optim.micro_batch_tokens, not --micro-batch
SELECTIVE = {"minor_dpo_packed_budget_selective"}  # scaling.activation_checkpointing: selective
VARLEN_CONFIGS = set(DATA_MODES)  # run by default only with --varlen: on the fixed-length pairs they save nothing
CHECKPOINTED = {"trl_checkpointing", "minor_dpo_checkpointing"}  # recompute each decoder block in backward
BETA, LR = 0.1, 1e-4


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="default: all; without --varlen all but the length-grouped and packed ones")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 mixed precision")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU), also on the Ray worker")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--shots", type=int, default=3, help="solved problems before each question (~55 tokens each)")
    p.add_argument("--pairs", type=int, default=128, help="distinct pairs in the data set (epochs repeat)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per forward, accumulated to --batch on both "
                   "sides (mdpo-ray optim.micro_batch_size, TRL gradient_accumulation_steps); default: --batch")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="minor_dpo_packed_budget's "
                   "optim.micro_batch_tokens (default: 2 x --max-length, the least that holds every pair)")
    p.add_argument("--max-length", type=int, default=None, help="data.max_length (default 512; 2048 with --varlen)")
    p.add_argument("--varlen", action="store_true", help="variable-length pairs (benchmarks/varlen_pairs.py)")
    p.add_argument("--window", type=int, default=4, help="steps per timed window")
    p.add_argument("--warmup", type=_positive, default=3, help="warm-up windows, not timed (Ray's own start-up, e.g. its "
                   "Train helper actors importing their modules, overlaps the first ~15 s of training)")
    p.add_argument("--windows", type=_positive, default=5, help="timed windows after the warm-up")
    p.add_argument("--rounds", type=_positive, default=1, help="run the configs this many times, interleaved; the Ray "
                   "target then compares each round's Ray and in-process runs, which ran minutes apart")
    p.add_argument("--allocator", default="mdpo-ray", choices=["mdpo-ray", "glibc"],
                   help="CPU: every process of both sides gets the glibc malloc settings a CPU-only local Ray "
                        "instance gives its workers (mdpo-ray, the default; a GLIBC_TUNABLES of your own wins), "
                        "or glibc's defaults (how the tables before 2026-12-02 ran)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n matmul rate (2048 CPU, 8192 GPU)")
    p.add_argument("--workdir", type=Path, default=None, help="model, pairs and run outputs (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each config")
    p.add_argument("--json", type=Path, default=None, help="also write every result to this file")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # a child process: one config
    p.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)  # parse, print, exit
    return p


# ------------------------------------------------------------------------------------------ shared inputs


def _model_config(args):
    from transformers import LlamaConfig

    from mdpo_ray.task.arith import build_tokenizer

    tokenizer = build_tokenizer()
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       intermediate_size=args.intermediate, max_position_embeddings=args.max_length,
                       tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _matmul_params(config) -> tuple[int, int, int]:
    """(all parameters, those that multiply: all but an untied input embedding table, the LM head's), on 'meta'."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - (0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel())
    return total, matmul, model.get_output_embeddings().weight.numel()


def prepare(args, workdir: Path) -> dict:
    """Save the random model + tokenizer and write the few-shot pairs; both sides load these files."""
    import torch
    from transformers import LlamaForCausalLM

    from mdpo_ray.config import BuiltinTaskConfig
    from mdpo_ray.task.arith import build_tokenizer, generate_task

    model_dir, pairs_path = workdir / "model", workdir / "pairs.jsonl"
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = args.max_length
    torch.manual_seed(0)
    LlamaForCausalLM(_model_config(args)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if args.varlen:
        rows = varlen_pairs.pairs(args.pairs, max_length=args.max_length)
        return _write_pairs(rows, model_dir, pairs_path)
    task = generate_task(BuiltinTaskConfig(n_sft_problems=max(10, 4 * args.shots), n_pref_pairs=args.pairs,
                                           n_eval_pairs=1, n_eval_problems=1))
    rng, solved = random.Random(0), task["sft"]
    rows = []
    for pair in task["pairs"]:
        shots = " ".join(s["prompt"] + s["chosen"] for s in rng.sample(solved, args.shots))
        rows.append({"prompt": f"{shots} {pair['prompt']}", "chosen": pair["chosen"], "rejected": pair["rejected"]})
    return _write_pairs(rows, model_dir, pairs_path)


def _write_pairs(rows: list[dict], model_dir: Path, pairs_path: Path) -> dict:
    pairs_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Tokens as mdpo_ray.data.pairs makes them: BOS + prompt, completion + EOS (TRL's are checked against these).
    lengths = [(1 + len(r["prompt"]), len(r["chosen"]) + 1, len(r["rejected"]) + 1) for r in rows]
    return {"model_dir": str(model_dir), "pairs": str(pairs_path),
            "tokens_per_pair": statistics.mean(2 * p + c + r for p, c, r in lengths),
            "completion_tokens_per_pair": statistics.mean(c + r for _, c, r in lengths)}


def matmul_rate(device: str, n: int) -> float:
    """FLOP/s of an n x n matmul in the benchmark's compute dtype (fp32 on CPU, bf16 on GPU), median of 10."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 20 if device == "cuda" else 3
    times = []
    for _ in range(11):
        sync()
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        times.append((time.perf_counter() - started) / reps)
    return 2 * n**3 / statistics.median(times[1:])


# ------------------------------------------------------------------------------------------- one config


def _windows(ends: list[float], steps_per_window: int, batch: int) -> list[float]:
    """pairs/s of each window between consecutive window ends (seconds); the first end closes the warm-up."""
    return [steps_per_window * batch / (b - a) for a, b in itertools.pairwise(ends)]


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system  # this process, all threads


def _peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_trl(args, assets: dict, precompute: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_ends, cpu, threads = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            cpu.append(_cpu_seconds())
            threads.append(torch.get_num_threads())

    gpu = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(args.workdir / args.one),
        per_device_train_batch_size=args.micro_batch or args.batch,
        gradient_accumulation_steps=args.batch // (args.micro_batch or args.batch), max_steps=_total_steps(args),
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=gpu, fp16=False, use_cpu=not gpu,  # DPOConfig defaults to bf16=True
        gradient_checkpointing=args.one in CHECKPOINTED,  # DPOConfig defaults to True, with its default kwargs
        disable_dropout=True, loss_type=["sigmoid"], beta=BETA, max_length=args.max_length,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch,
        logging_strategy="no", report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
    )
    trainer = DPOTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(assets["model_dir"]),
                         train_dataset=load_dataset("json", data_files=assets["pairs"], split="train"),
                         callbacks=[Clock()])
    data = trainer.train_dataset
    tokens = statistics.mean(2 * len(p) + len(c) + len(r)
                             for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    with _profiled(args):
        trainer.train()
    # Window ends, from that of the last warm-up window (where the first timed window starts).
    first_end = args.window * args.warmup - 1
    ends, cpu = step_ends[first_end :: args.window], cpu[first_end :: args.window]
    return {"windows": _windows(ends, args.window, args.batch), "threads": threads[-1], "tokens_per_pair": tokens,
            "cores": (cpu[-1] - cpu[0]) / (ends[-1] - ends[0])}


class _LogClock:
    """The loop's metric sink: the wall time of every log point (one per window) and the loop's step time."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float, float]] = []  # (step, perf_counter, step_time_s, CPU seconds)
        self.threads: list[dict[int, float]] = []  # CPU seconds of each thread of this process, at each point

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "perf/step_time_s" in metrics:
            self.points.append((step, time.perf_counter(), metrics["perf/step_time_s"], _cpu_seconds()))
            self.threads.append(_thread_seconds(os.getpid()))

    def tag(self, key: str, value: str) -> None:
        pass

    def close(self) -> None:
        pass


def _run_config(args, assets: dict, name: str, loss: str, reference: str):
    from mdpo_ray.config import RunConfig

    gpu = args.device == "cuda"
    return RunConfig.model_validate({
        "name": f"bench-{name}", "output_dir": str(args.workdir / name), "seed": 0, "reference": reference,
        "model": {"name_or_path": assets["model_dir"]},
        # padded unless the configuration says otherwise: the table's minor_dpo rows are the padded step
        "data": {"train": assets["pairs"], "max_length": args.max_length, "padding_free": False}
        | DATA_MODES.get(name, {}),
        "loss": {"name": loss, "beta": BETA},
        "optim": {"lr": LR, "warmup_steps": 0, "max_steps": _total_steps(args), "batch_size": args.batch,
                  "grad_clip": 1.0} | ({"micro_batch_tokens": args.micro_batch_tokens} if name in BUDGETED
                                       else {"micro_batch_size": args.micro_batch}),
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": args.threads,
                    "mixed_precision": "bf16" if gpu else "fp32",
                    "activation_checkpointing": True if name in CHECKPOINTED else "selective" if name in SELECTIVE else False},
        "checkpoint": {"every_steps": _total_steps(args), "num_to_keep": 1},
        "tracking": {"log_every_steps": args.window, "mlflow_uri": f"sqlite:///{args.workdir / name / 'mlflow.db'}"},
        "eval": {"batch_size": args.batch},  # the precompute batch, as TRL's precompute_ref_batch_size
    })


def run_ours(args, assets: dict, name: str, loss: str, reference: str, *, full_logits: bool) -> dict:
    import torch

    from mdpo_ray.training import logps
    from mdpo_ray.training.train_loop import Worker, train

    if full_logits:  # no hook on the head: it sees all (2B, T) positions, the log-softmax is still chunked fp32
        logps._head_on_scored_rows = lambda *_: _no_hook()  # whatever the hook's signature
    clock = _LogClock()
    with _profiled(args):
        train(_run_config(args, assets, name, loss, reference), Worker(sink=clock))
    points, threads = clock.points[args.warmup - 1 :], clock.threads[args.warmup - 1 :]
    (_, first, _, cpu0), (_, last, _, cpu1) = points[0], points[-1]
    return {"windows": _windows([t for _, t, _, _ in points], args.window, args.batch),
            "loop_windows": [args.batch / s for _, _, s, _ in points[1:]],
            "threads": torch.get_num_threads(), "cores": (cpu1 - cpu0) / (last - first),
            "thread_cores": _thread_split(threads[0], threads[-1], last - first, torch.get_num_threads())}


def _no_hook():
    from contextlib import nullcontext

    return nullcontext([])


def run_ray(args, assets: dict, name: str, loss: str, reference: str) -> dict:
    import psutil
    import ray
    from mlflow.tracking import MlflowClient

    from mdpo_ray import cluster, launch

    # The local Ray instance `mdpo-ray train` starts. Ray gives a worker OMP_NUM_THREADS = its CPUs
    # only when unset (ray/_private/utils.py set_omp_num_threads_if_unset): the worker inherits ours
    # (main() sets it for every child), the in-process thread count.
    assert os.environ["OMP_NUM_THREADS"] == str(args.threads)
    os.environ.pop("RAY_ADDRESS", None)
    cluster.init_ray(use_gpu=args.device == "cuda")
    worker = {"rss": 0, "omp": None}
    snapshots: list[tuple[float, float, float, dict[int, float]]] = []  # (time, worker CPU s, Ray's other
    # processes' CPU s, CPU s of each worker thread)
    done = threading.Event()

    def watch() -> None:  # the Train worker is Ray's process, not ours: find it, then sample its RSS
        proc = None
        while not done.wait(2.0):
            try:
                proc = proc or next((p for p in psutil.process_iter(["cmdline"])
                                     if "RayTrainWorker" in " ".join(p.info["cmdline"] or ())), None)
                if proc is not None:
                    worker["rss"] = max(worker["rss"], proc.memory_info().rss)
                    worker["omp"] = worker["omp"] or proc.environ().get("OMP_NUM_THREADS")
                    snapshots.append((time.time(), sum(proc.cpu_times()[:2]), _ray_cpu_seconds(psutil) -
                                      sum(proc.cpu_times()[:2]), _thread_seconds(proc.pid)))
            except psutil.Error:  # gone, or not ours to read: look again
                proc = None

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = launch.train(_run_config(args, assets, name, loss, reference))
    finally:
        done.set()
        ray.shutdown()
    history = sorted(MlflowClient(summary.config.mlflow_uri).get_metric_history(summary.mlflow_run_id,
                                                                                 "perf/step_time_s"),
                     key=lambda m: m.step)[args.warmup - 1 :]
    # CPU use over the timed windows: the worker's cores, and those of Ray's own processes beside it.
    first, last = history[0].timestamp / 1000, history[-1].timestamp / 1000
    inside = [snap for snap in snapshots if first <= snap[0] <= last] or [(0.0, 0.0, 0.0, {}), (1.0, None, None, {})]
    (t0, w0, o0, th0), (t1, w1, o1, th1) = inside[0], inside[-1]
    cores = {"cores": (w1 - w0) / (t1 - t0), "ray_cores": (o1 - o0) / (t1 - t0),
             "thread_cores": _thread_split(th0, th1, t1 - t0, args.threads)} if w1 is not None and t1 > t0 else {}
    return {"windows": _windows([m.timestamp / 1000 for m in history], args.window, args.batch),
            "loop_windows": [args.batch / m.value for m in history[1:]],
            **cores,
            "threads": int(worker["omp"]) if worker["omp"] else None,
            "peak_memory": worker["rss"] if args.device == "cpu" else None}


def _thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process (Linux /proc, through psutil)."""
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def _thread_split(before: dict[int, float], after: dict[int, float], seconds: float, compute: int) -> list[float]:
    """Cores used by the `compute` busiest threads (the step's: the Python thread that runs it and the
    OpenMP threads it wakes), busiest first, then by all other threads together (Ray's, in a Ray worker)."""
    used = sorted(((after[t] - before.get(t, 0.0)) / seconds for t in after), reverse=True)
    return [*used[:compute], sum(used[compute:])]


def _ray_cpu_seconds(psutil) -> float:
    """CPU seconds of every process this one started (ray.init's local cluster: GCS, raylet, workers, ...)."""
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _total_steps(args) -> int:
    return args.window * (args.warmup + args.windows)


class _profiled:
    """torch.profiler over the whole run when --profile: the top ops by self time go to stderr."""

    def __init__(self, args) -> None:
        self.args, self.prof = args, None

    def __enter__(self):
        if self.args.profile:
            import torch.profiler

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(*exc)
            sort = "self_cuda_time_total" if self.args.device == "cuda" else "self_cpu_time_total"
            print(self.prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48),
                  file=sys.stderr)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    assets = json.loads((args.workdir / "assets.json").read_text())
    shutil.rmtree(args.workdir / args.one, ignore_errors=True)  # a fresh run: mdpo-ray would resume an old one
    side, loss, reference = CONFIGS[args.one]
    if side == "trl":
        out = run_trl(args, assets, precompute=reference == "precompute")
    elif side == "ray":
        out = run_ray(args, assets, args.one, loss, reference)
    else:
        out = run_ours(args, assets, args.one, loss, reference, full_logits=side == "ours_full_logits")
    out.setdefault("peak_memory", _peak_memory(args.device))
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------------------------- parent


def _executed_flops_per_pair(side: str, reference: str, assets: dict, n_body: int, n_head: int, gpu: bool,
                             checkpointed: bool = False) -> float:
    """Matmul FLOPs a side actually runs per pair: the body on every token (a second forward of it in
    backward when checkpointed); the LM head on the completion rows (mdpo-ray; TRL on Triton devices) or
    on every token (TRL on CPU, where it does not compact; the full-logits variant), with TRL's chunked
    head recomputing its logits in backward (4 passes, not 3)."""
    tokens, completion = assets["tokens_per_pair"], assets["completion_tokens_per_pair"]
    rows = completion if side in ("ours", "ray") or (side == "trl" and gpu) else tokens
    head_passes = 4 if side == "trl" else 3
    policy = (8 if checkpointed else 6) * n_body * tokens + 2 * head_passes * n_head * rows
    return policy + (2 * (n_body * tokens + n_head * rows) if reference == "resident" else 0)


def _table(args, assets: dict, results: dict, rate: float, n_matmul: int, n_head: int) -> list[str]:
    def pairing(name: str) -> str | None:
        base = "trl_precompute" if CONFIGS[name][2] == "precompute" else "trl"
        base = "trl_checkpointing" if name in CHECKPOINTED else base
        return base if base in results and name != base else None

    header = (f"{'config':22s} {'pairs/s':>7s} {'tokens/s':>8s} {'vs TRL':>6s} {'peak mem':>9s} {'vs TRL':>6s} "
              f"{'MFU':>6s} {'HFU':>5s} {'cores':>9s}  what")
    lines = [header]
    for name, r in results.items():
        side, loss, reference = CONFIGS[name]
        pairs = statistics.median(r["windows"])
        model_flops = (8 if reference == "resident" else 6) * n_matmul * pairs * assets["tokens_per_pair"]
        executed = _executed_flops_per_pair(side, reference, assets, n_matmul - n_head, n_head,
                                            args.device == "cuda", name in CHECKPOINTED) * pairs
        base = pairing(name)
        speed = f"{pairs / statistics.median(results[base]['windows']):5.2f}x" if base else ""
        mem = f"{r['peak_memory'] / 2**30:5.2f} GiB" if r["peak_memory"] else "n/a"
        mem_ratio = f"{r['peak_memory'] / results[base]['peak_memory']:5.2f}x" \
            if base and r["peak_memory"] and results[base]["peak_memory"] else ""
        cores = f"{r['cores']:.2f}" if r.get("cores") is not None else "n/a"
        cores += f"+{r['ray_cores']:.2f}" if r.get("ray_cores") is not None else ""
        what = {"trl": "TRL DPOTrainer", "ours": "mdpo-ray in-process", "ours_full_logits": "mdpo-ray, head on all",
                "ray": "mdpo-ray Ray Train, 1 worker"}[side] + f", {loss}, {reference} reference" \
            + (", activation checkpointing" if name in CHECKPOINTED else "") \
            + "".join(f", {key}" for key in DATA_MODES.get(name, {})) \
            + (f", micro_batch_tokens {args.micro_batch_tokens}" if name in BUDGETED else "") \
            + (", selective checkpointing" if name in SELECTIVE else "")
        lines.append(f"{name:22s} {pairs:7.2f} {pairs * assets['tokens_per_pair']:8.0f} {speed:>6s} "
                     f"{mem:>9s} {mem_ratio:>6s} {model_flops / rate:6.1%} {executed / rate:5.0%} {cores:>9s}  {what}")
    lines += ["MFU: (6N + 2N with a resident reference) x tokens/s over the matmul rate, N the multiplying parameters",
              "  (model FLOPs; they count the LM head at every position, which mdpo-ray skips on prompt",
              "  tokens, so its MFU can pass 100%). HFU: the matmul FLOPs each side actually runs over the same rate.",
              "  cores: CPU seconds per second over the timed windows (Ray: the worker + Ray's other processes)."]
    split = [f"{name} {' + '.join(f'{c:.2f}' for c in r['thread_cores'][:-1])} (other threads {r['thread_cores'][-1]:.2f})"
             for name, r in results.items() if r.get("thread_cores")]
    if split:
        lines.append("  cores of the step's threads (busiest first): " + "; ".join(split))
    return lines


def _targets(results: dict) -> list[str]:
    def speed(name: str) -> float:
        return statistics.median(results[name]["windows"])

    lines = []
    for ours, trl in (("dpo", "trl"), ("minor_dpo", "trl"), ("dpo_precompute", "trl_precompute"),
                      ("minor_dpo_precompute", "trl_precompute"), ("minor_dpo_checkpointing", "trl_checkpointing")):
        if ours in results and trl in results:
            s = speed(ours) / speed(trl)
            m = results[ours]["peak_memory"] / results[trl]["peak_memory"]
            lines.append(f"  {ours} vs {trl}: {s:.2f}x pairs/s (target >= 1.5x: {'met' if s >= 1.5 else 'MISSED'}), "
                         f"{m:.2f}x peak memory (target <= 0.5x: {'met' if m <= 0.5 else 'MISSED'})")
    for ours in ("minor_dpo_packed", "minor_dpo_grouped", "minor_dpo_grouped_packed",  # issue 24, --varlen pairs
                 "minor_dpo_packed_budget", "minor_dpo_packed_budget_selective"):
        if ours in results and "trl" in results:
            s, m = speed(ours) / speed("trl"), results[ours]["peak_memory"] / results["trl"]["peak_memory"]
            lines.append(f"  {ours} vs trl: {s:.2f}x pairs/s (target >= 3x: {'met' if s >= 3 else 'MISSED'}), "
                         f"{m:.2f}x peak memory (target <= 0.4x: {'met' if m <= 0.4 else 'MISSED'})")
        if ours in results and "minor_dpo" in results:
            s = speed(ours) / speed("minor_dpo")
            lines.append(f"  {ours} vs minor_dpo (padded): {s:.2f}x pairs/s (target >= 2x: "
                         f"{'met' if s >= 2 else 'MISSED'})")
    if "ray_minor_dpo" in results and "minor_dpo" in results:
        ray, local = results["ray_minor_dpo"], results["minor_dpo"]
        paired = [r / i - 1 for r, i in zip(ray["round_medians"], local["round_medians"], strict=False)]
        wall = statistics.median(paired)
        loop = statistics.median(ray["loop_windows"]) / statistics.median(local["loop_windows"]) - 1
        rounds = f" (median of {len(paired)} rounds: {', '.join(f'{g:+.1%}' for g in paired)})" if len(paired) > 1 else ""
        lines.append(f"  ray_minor_dpo vs minor_dpo in-process: {wall:+.1%} pairs/s wall-clock between log points"
                     f"{rounds} (target within 10%: {'met' if abs(wall) <= 0.10 else 'MISSED'}); {loop:+.1%} by the "
                     f"loop's own step timer (perf/step_time_s)")
    return lines


def _run_child(args, name: str, env: dict) -> dict | None:
    """One configuration in a fresh process: its RESULT, or None (said) when it failed."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--workdir", str(args.workdir), "--one", name],
                          capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"{name}: failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return None
    r = json.loads(line.removeprefix("RESULT ")) | {"seconds": time.perf_counter() - started}
    if args.profile:
        r["profile"] = proc.stderr[proc.stderr.find("-----") - 1 :] if "-----" in proc.stderr else proc.stderr[-4000:]
    return r


def _merge_round(results: dict, name: str, r: dict) -> None:
    """Rounds of one config pool their windows (the table's median is over all of them); each round's
    own median is kept for paired comparisons, since the machine's speed drifts between rounds."""
    r = r | {"round_medians": [statistics.median(r["windows"])]}
    if name not in results:
        results[name] = r
        return
    pooled = results[name]
    for key in ("windows", "loop_windows", "round_medians"):
        if key in r:
            pooled[key] = pooled[key] + r[key]
    if r.get("peak_memory") and pooled.get("peak_memory"):
        pooled["peak_memory"] = max(pooled["peak_memory"], r["peak_memory"])


def check_args(args) -> None:
    """Resolve the options, the model size and every mdpo-ray run config without running anything (no GPU needed)."""
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / "mdpo-vs-trl-check"
    n_total, n_matmul, _ = _matmul_params(_model_config(args))
    assets = {"model_dir": str(args.workdir / "model"), "pairs": str(args.workdir / "pairs.jsonl")}
    for name in args.configs:
        side, loss, reference = CONFIGS[name]
        if side != "trl":
            _run_config(args, assets, name, loss, reference)  # pydantic-validated, as the run would be
    print(json.dumps({k: str(v) for k, v in vars(args).items()} | {"parameters": n_total, "matmul_parameters": n_matmul,
                                                                  "steps_per_config": _total_steps(args)}, indent=1))


def _resolve(args):
    """The defaults that depend on --varlen."""
    args.max_length = args.max_length or (2048 if args.varlen else 512)
    args.micro_batch_tokens = args.micro_batch_tokens or 2 * args.max_length
    args.configs = args.configs or [name for name in CONFIGS if args.varlen or name not in VARLEN_CONFIGS]
    return args


def main() -> None:
    args = _resolve(_parser().parse_args())
    if args.check_args:
        return check_args(args)
    if args.one:
        return child(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdpo-vs-trl-"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    assets = prepare(args, args.workdir)
    (args.workdir / "assets.json").write_text(json.dumps(assets))
    n_total, n_matmul, n_head = _matmul_params(_model_config(args))
    size = args.matmul_size or (8192 if args.device == "cuda" else 2048)
    rate = matmul_rate(args.device, size)
    precision = "bf16 mixed precision (fp32 master weights)" if args.device == "cuda" else "fp32"
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch threads"
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{n_total / 1e6:.1f}M parameters ({n_matmul / 1e6:.1f}M multiply); {device}; {precision}")
    kind = "variable-length pairs (benchmarks/varlen_pairs.py)" if args.varlen else \
        f"built-in arithmetic pairs, {args.shots}-shot prompts"
    print(f"pairs: {args.pairs} {kind}, {assets['tokens_per_pair'] / 2:.0f} tokens per sequence on average "
          f"({assets['completion_tokens_per_pair'] / 2:.0f} of them completion); batch {args.batch} pairs"
          + (f" in micro-batches of {args.micro_batch}" if args.micro_batch else ""))
    if args.varlen:
        print("  " + varlen_pairs.summary(varlen_pairs.pair_lengths(args.pairs, max_length=args.max_length)))
    print(f"measured {size}x{size} matmul rate: {rate / 1e9:.1f} GFLOP/s; timing: {args.warmup * args.window}-step "
          f"warm-up, median of {args.windows} windows of {args.window} steps")
    print("set equal on both sides: precision as above, gradient checkpointing only in the *_checkpointing pair "
          "(TRL default: on), dropout 0, "
          f"torch AdamW, fused, lr {LR:g} (TRL optim=adamw_torch_fused), constant LR, no warm-up, grad clip 1.0, "
          f"beta {BETA}, "
          f"max_length {args.max_length}, precompute batch = train batch, sdpa attention; TRL logging_strategy=no, "
          "report_to=none, save_strategy=no, eval_strategy=no", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                        "HF_HOME": str(args.workdir / "hf"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env |= _allocator_env(args)
    args.glibc_tunables = env["GLIBC_TUNABLES"]
    print(f"allocator, every process of both sides: GLIBC_TUNABLES={env['GLIBC_TUNABLES']!r}"
          + (" (glibc's defaults)" if not env["GLIBC_TUNABLES"] else ""), flush=True)
    results = _run_configs(args, assets, env, rate)
    print()
    lines = _table(args, assets, results, rate, n_matmul, n_head) + ["targets:"] + _targets(results)
    print("\n".join(lines))
    if args.json:
        _write_json(args, assets, results, rate)


def _allocator_env(args) -> dict[str, str]:
    """The same glibc malloc settings for every child of both sides. It is set (empty: glibc's
    defaults) even for the Ray config, whose local instance then leaves it as it is (cluster.init_ray)."""
    if "GLIBC_TUNABLES" in os.environ:
        return {}
    if args.allocator == "glibc" or args.device == "cuda":  # a GPU run's local instance does not set it either
        return {"GLIBC_TUNABLES": ""}
    from mdpo_ray import cluster

    return dict(cluster.CPU_ALLOCATOR_ENV)


def _run_configs(args, assets: dict, env: dict, rate: float) -> dict[str, dict]:
    """Each config in its own process, round after round. Interrupted (Ctrl-C, `timeout -s INT`), it
    returns what finished, so the table still covers those."""
    results: dict[str, dict] = {}
    try:
        for round_ in range(1, args.rounds + 1):
            for name in args.configs:
                r = _run_child(args, name, env)
                if r is None:
                    continue
                _merge_round(results, name, r)
                if args.json:  # after every config: a run stopped part-way keeps what it measured
                    _write_json(args, assets, results, rate)
                label = f"  {name}" + (f" (round {round_}/{args.rounds})" if args.rounds > 1 else "")
                print(f"{label}: {statistics.median(r['windows']):.2f} pairs/s (windows "
                      f"{', '.join(f'{w:.2f}' for w in r['windows'])}), threads {r['threads']}, {r['seconds']:.0f} s",
                      flush=True)
                if "tokens_per_pair" in r and abs(r["tokens_per_pair"] - assets["tokens_per_pair"]) > 1e-6:
                    print(f"  note: {name} tokenized {r['tokens_per_pair']:.2f} tokens per pair, mdpo-ray "
                          f"{assets['tokens_per_pair']:.2f}")
                if args.profile:
                    print(r["profile"])
    except KeyboardInterrupt:
        print(f"\ninterrupted: the table covers the {len(results)} configs that finished", flush=True)
    return results


def _write_json(args, assets: dict, results: dict, rate: float) -> None:
    args.json.write_text(json.dumps({"assets": assets, "matmul_flops": rate, "results": results,
                                     "argv": sys.argv[1:], "GLIBC_TUNABLES": args.glibc_tunables}, indent=1))


if __name__ == "__main__":
    main()
