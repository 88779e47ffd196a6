"""Prepare the built-in default once: generate the arithmetic task, SFT-warm a tiny Llama (sft.py), cache both.

The result lives in `<cache_dir>/builtin-<hash of the task config>`, built under a file lock in a temp
dir and renamed into place, so concurrent sweep trials build it once and never see half of it. The SFT
model does not depend on the rejected-answer kind (every kind poses the same problems), so one model
serves all kinds; each kind's pairs are written beside it on first use, under `pairs/<kind>/`. On-policy
rejected answers are sampled from that SFT model, so they can only be made after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from transformers import LlamaForCausalLM

from mdpo_ray.config import BuiltinTaskConfig
from mdpo_ray.task import arith, sft
from mdpo_ray.task.generation import extract_answer, greedy_answer_accuracy, sample_completions

FORMAT_VERSION = 2  # bump when the task, tokenizer or files change, so old caches are not reused
MARKER = "assets.json"  # written last: its presence means the directory is complete
ON_POLICY_SAMPLES = 4  # samples per problem; the first one with a wrong final answer becomes the rejected answer
ON_POLICY_TEMPERATURE = 1.0
PAIRS_INFO = "info.json"  # written last in pairs/<kind>/: its presence means the pairs are complete


@dataclass(frozen=True)
class BuiltinAssets:
    root: Path
    model_dir: Path  # save_pretrained dir of the SFT model and its tokenizer
    train_path: Path  # JSONL of {prompt, chosen, rejected}
    eval_path: Path  # held-out pairs, same fields
    generation_eval_path: Path  # held-out problems: JSONL of {prompt, answer}
    sft_accuracy: float  # greedy answer accuracy of the SFT model on all held-out problems
    sft_steps: int
    reused: bool  # True: found in the cache, nothing was trained


def _assets(root: Path, figures: dict, reused: bool, kind: str) -> BuiltinAssets:
    return BuiltinAssets(
        root=root,
        model_dir=root / "model",
        train_path=root / "pairs" / kind / "train.jsonl",
        eval_path=root / "pairs" / kind / "eval_pairs.jsonl",
        generation_eval_path=root / "eval_problems.jsonl",
        sft_accuracy=figures["sft_accuracy"],
        sft_steps=figures["sft_steps"],
        reused=reused,
    )


def cache_key(cfg: BuiltinTaskConfig) -> str:
    """A short hash of everything that shapes the SFT model and problems: every field but cache_dir and
    rejected_kind (the kinds live side by side in one directory), plus FORMAT_VERSION."""
    fields = cfg.model_dump(mode="json", exclude={"cache_dir", "rejected_kind"})
    text = json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_builtin(cfg: BuiltinTaskConfig, log: Callable[[str], None] = print) -> BuiltinAssets:
    """Return the cached assets for `cfg`, building them first (data + SFT, ~2 min on 2 cores) if needed."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"builtin-{cache_key(cfg)}"
    with FileLock(str(root) + ".lock"):
        if (root / MARKER).is_file():
            figures = json.loads((root / MARKER).read_text())
            log(f"builtin task: reusing {root} (SFT {figures['sft_steps']} steps, "
                f"held-out accuracy {figures['sft_accuracy']:.1%})")
            _ensure_pairs(cfg, root, log)
            return _assets(root, figures, reused=True, kind=cfg.rejected_kind)
        log(f"builtin task: building {root} (SFT until {cfg.sft_target_accuracy:.0%} held-out accuracy; "
            "about 2 minutes on 2 CPU cores, once per task config)")
        for stale in cache_dir.glob(f".{root.name}-*"):  # left by a killed build: only the lock holder writes them
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            figures = _build(cfg, staging, log)
            if root.exists():  # a directory without its marker cannot come from us; replace it
                shutil.rmtree(root)
            os.rename(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _ensure_pairs(cfg, root, log)
    return _assets(root, figures, reused=False, kind=cfg.rejected_kind)


def _ensure_pairs(cfg: BuiltinTaskConfig, root: Path, log: Callable[[str], None]) -> None:
    """Write pairs/<cfg.rejected_kind>/ unless it is complete. The caller holds the lock."""
    final = root / "pairs" / cfg.rejected_kind
    if (final / PAIRS_INFO).is_file():
        return
    task = arith.generate_task(cfg)
    info: dict = {"kind": cfg.rejected_kind}
    if cfg.rejected_kind == "on_policy":
        started = time.perf_counter()
        tokenizer = arith.build_tokenizer()
        model = LlamaForCausalLM.from_pretrained(root / "model")
        with sft.torch_threads():
            for split, seed in (("pairs", cfg.seed), ("eval_pairs", cfg.seed + 1)):
                task[split], info[split] = _on_policy(model, tokenizer, task[split], seed=seed)
        info["seconds"] = round(time.perf_counter() - started, 1)
        log(f"builtin task: on-policy rejected answers sampled from the SFT model in {info['seconds']:.0f} s: "
            f"{info['pairs']['kept']} training and {info['eval_pairs']['kept']} held-out pairs (problems whose "
            f"{ON_POLICY_SAMPLES} samples all had the right answer are left out: "
            f"{info['pairs']['all_correct']} + {info['eval_pairs']['all_correct']})")
    for stale in root.glob(f".{cfg.rejected_kind}-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.rejected_kind}-", dir=root))
    try:
        _write_jsonl(staging / "train.jsonl", task["pairs"])
        _write_jsonl(staging / "eval_pairs.jsonl", task["eval_pairs"])
        (staging / PAIRS_INFO).write_text(json.dumps(info, indent=2))
        if final.exists():  # incomplete (no info file): not ours to trust
            shutil.rmtree(final)
        final.parent.mkdir(exist_ok=True)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _on_policy(model, tokenizer, rows: list[dict], *, seed: int) -> tuple[list[dict], dict]:
    """Each row's rejected answer: the first of ON_POLICY_SAMPLES samples whose final answer is wrong
    (or missing). Rows whose samples were all right have nothing to reject and are left out."""
    samples = sample_completions(model, tokenizer, [r["prompt"] for r in rows], n=ON_POLICY_SAMPLES,
                                 temperature=ON_POLICY_TEMPERATURE, max_new_tokens=arith.MAX_NEW_TOKENS,
                                 batch_size=256, seed=seed)
    kept = []
    for row, texts in zip(rows, samples, strict=True):
        answer = extract_answer(row["chosen"])
        wrong = next((t for t in texts if extract_answer(t) != answer), None)
        if wrong is not None:
            kept.append(row | {"rejected": wrong})
    return kept, {"kept": len(kept), "all_correct": len(rows) - len(kept)}


def _build(cfg: BuiltinTaskConfig, out: Path, log: Callable[[str], None]) -> dict:
    with sft.torch_threads():  # SFT changes the count as it goes
        return _build_into(cfg, out, log)


def _build_into(cfg: BuiltinTaskConfig, out: Path, log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    task = arith.generate_task(cfg)
    tokenizer = arith.build_tokenizer()
    log(f"builtin task: {len(task['sft'])} SFT problems, {len(task['pairs'])} preference problems, "
        f"{len(task['eval_pairs'])} held-out pairs, {len(task['eval_problems'])} held-out problems")
    model, steps = sft.warm_up(cfg, task, tokenizer, log)
    # The reported figure scores all held-out problems; the stopping evals saw only the first SFT_EVAL_PROBLEMS.
    correct, total = greedy_answer_accuracy(
        model, tokenizer, task["eval_problems"], max_new_tokens=arith.MAX_NEW_TOKENS, batch_size=256
    )
    seconds = time.perf_counter() - started
    figures = {
        "format_version": FORMAT_VERSION,
        "sft_accuracy": correct / total,
        "sft_steps": steps,
        "build_seconds": round(seconds, 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "config": cfg.model_dump(mode="json", exclude={"cache_dir", "rejected_kind"}),
    }
    layout = _assets(out, figures, reused=False, kind=cfg.rejected_kind)  # the final directory's file names
    model.save_pretrained(layout.model_dir)  # safetensors
    tokenizer.save_pretrained(layout.model_dir)
    _write_jsonl(layout.generation_eval_path, task["eval_problems"])
    (out / MARKER).write_text(json.dumps(figures, indent=2))  # last: marks the directory complete
    log(f"builtin task: built in {seconds:.0f} s, SFT {steps} steps, "
        f"held-out accuracy {correct}/{total} = {correct / total:.1%}")
    return figures


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
