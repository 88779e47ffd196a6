"""The SFT warm-up of the built-in default: train a tiny Llama on the chosen answers until it solves part
of the task, on a torch thread count that follows the machine's load. builtin.py calls warm_up once per
task config, inside torch_threads (which its on-policy sampling uses too), and caches what it returns.

The preference stage needs a reference that already solves part of the task. SFT accuracy has a phase
transition: with the default config it stays at 0-8% for 500-750 steps, then reaches 40% within 150-200
more, at a step that depends on the seed and the CPU (900 and 750 for seeds 0 and 1 on 2 CPU cores; see
docs/builtin_task.md). So a fixed step count is unreliable: SFT stops at the first held-out eval that
reaches `sft_target_accuracy`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import torch
from transformers import LlamaForCausalLM

from mdpo_ray.config import BuiltinTaskConfig
from mdpo_ray.task import arith
from mdpo_ray.task.generation import greedy_answer_accuracy

SFT_EVAL_PROBLEMS = 200  # held-out problems a stop decision scores; the final figure uses all of them
SFT_SCREEN_PROBLEMS = 50  # scored first at each SFT eval: the other 150 only once these reach half the target
SFT_WARMUP_STEPS = 100
SFT_BETAS = (0.9, 0.98)
SFT_GRAD_CLIP = 1.0
SFT_LENGTH_GROUPS = 2  # micro-batches of length-sorted rows a step runs as: 12-17% less CPU than one padded batch
SFT_THREADS_EVERY = 10  # SFT steps between choices of its torch thread count (_free_cores)


@contextmanager
def torch_threads() -> Iterator[None]:
    """Within: torch uses the cores other processes leave free (_free_cores); the caller's count after.
    Ray workers get 1 thread; the driver, which builds the task, may use more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_free_cores(_cpu_mark(), wait_s=0.2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cpu_mark() -> tuple[float, float, float]:
    """(wall, busy CPU of the whole machine, CPU of this process) seconds: where _free_cores measures from."""
    cpu = psutil.cpu_times()
    busy = sum(getattr(cpu, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
    return time.perf_counter(), busy, time.process_time()


def _free_cores(since: tuple[float, float, float], wait_s: float = 0.0) -> int:
    """The cores other processes left free since `since` (a _cpu_mark), as a torch thread count: all of
    them less each core those processes kept busy more than a quarter of the time, and at least 1.

    torch's OpenMP threads (libgomp) wait for each other at the end of every op by spinning. With nothing
    else running, 2 threads on 2 cores run an SFT step in 80 ms against 120 ms on one (and in 130-160 ms
    with OMP_WAIT_POLICY=PASSIVE, which makes them sleep instead); but as soon as another process wants a
    core, a spinning thread takes the time slice its partner needs: 280 ms a step beside one busy process,
    over 1 s at load 3. One thread never waits for another. The model does not depend on the thread
    count (tests/test_builtin.py), so SFT re-chooses it every SFT_THREADS_EVERY steps as the load changes."""
    time.sleep(wait_s)
    wall, busy, own = (now - then for now, then in zip(_cpu_mark(), since, strict=True))
    others = max(0.0, busy - own) / max(wall, 1e-3)  # cores' worth of CPU the other processes used
    return max(1, math.floor((os.cpu_count() or 1) - others + 0.25))


def _sft_tensors(rows: list[dict], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, T) input ids, right-padded; labels with the prompt and padding masked to -100; (N,) lengths.

    Each sequence is BOS + prompt + chosen + EOS. Tokenized once up front, so a step only indexes tensors.
    """
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    completions = tokenizer([r["chosen"] for r in rows], add_special_tokens=False)["input_ids"]
    lengths = [len(p) + len(c) + 1 for p, c in zip(prompts, completions)]
    width = max(lengths)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids, labels = [], []
    for prompt, completion, length in zip(prompts, completions, lengths):  # lists, then one tensor: one a row costs 1 s
        input_ids.append(prompt + completion + [eos] + [pad] * (width - length))
        labels.append([-100] * len(prompt) + completion + [eos] + [-100] * (width - length))
    return torch.tensor(input_ids), torch.tensor(labels), torch.tensor(lengths)


def _sft_backward(model, input_ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Backpropagate one batch's loss, the next-token cross-entropy averaged over its completion + EOS tokens,
    and return it. The batch runs as SFT_LENGTH_GROUPS micro-batches of rows sorted by length, each cut to
    its longest row, their summed losses divided by the whole batch's token count: the gradient of the one
    padded batch (up to float rounding), with less padding computed (a 2-step problem is ~45 tokens, a
    3-step one up to 64)."""
    order = torch.argsort(lengths, stable=True)
    n_tokens = int((labels[:, 1:] != -100).sum())
    total = torch.zeros(())
    # No attention mask: padding is on the right, so causal attention never lets a real token see it.
    for part in order.chunk(SFT_LENGTH_GROUPS):
        width = int(lengths[part].max())
        logits = model(input_ids=input_ids[part, :width]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[part, 1:width].flatten(),
                                                 ignore_index=-100, reduction="sum") / n_tokens
        loss.backward()
        total += loss.detach()
    return total


def warm_up(cfg: BuiltinTaskConfig, task: dict, tokenizer, log: Callable[[str], None]) -> tuple[LlamaForCausalLM, int]:
    """Train until the first eval reaching cfg.sft_target_accuracy, or cfg.sft_max_steps; return (model, steps)."""
    with torch.random.fork_rng(devices=[]):  # seed the init and batch order without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return _sft_loop(cfg, task, tokenizer, log)


def _sft_loop(
    cfg: BuiltinTaskConfig, task: dict, tokenizer, log: Callable[[str], None]
) -> tuple[LlamaForCausalLM, int]:
    model = LlamaForCausalLM(arith.model_config(cfg, tokenizer))
    model.train()
    input_ids, labels, lengths = _sft_tensors(task["sft"], tokenizer)
    eval_problems = task["eval_problems"][:SFT_EVAL_PROBLEMS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=SFT_BETAS)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / SFT_WARMUP_STEPS))
    started = time.perf_counter()
    order = torch.randperm(len(input_ids))
    cursor = 0
    mark = _cpu_mark()
    for step in range(1, cfg.sft_max_steps + 1):
        if step % SFT_THREADS_EVERY == 0:
            torch.set_num_threads(_free_cores(mark))
            mark = _cpu_mark()
        if cursor + cfg.sft_batch_size > len(order):  # a new epoch: reshuffle
            order, cursor = torch.randperm(len(input_ids)), 0
        index = order[cursor : cursor + cfg.sft_batch_size]
        cursor += cfg.sft_batch_size
        optimizer.zero_grad(set_to_none=True)
        loss = _sft_backward(model, input_ids[index], labels[index], lengths[index])
        torch.nn.utils.clip_grad_norm_(model.parameters(), SFT_GRAD_CLIP)
        optimizer.step()
        warmup.step()
        if step % cfg.sft_eval_every_steps == 0 or step == cfg.sft_max_steps:
            correct, total = _stopping_eval(model, tokenizer, eval_problems, cfg.sft_target_accuracy)
            log(f"builtin SFT step {step}/{cfg.sft_max_steps}: loss {loss.item():.4f}, "
                f"held-out accuracy {correct}/{total} = {correct / total:.1%} ({time.perf_counter() - started:.0f} s)")
            if correct / total >= cfg.sft_target_accuracy:
                return model, step
    log(f"WARNING: builtin SFT reached sft_max_steps={cfg.sft_max_steps} below sft_target_accuracy="
        f"{cfg.sft_target_accuracy:.0%}; continuing with this model (raise builtin.sft_max_steps to train longer)")
    return model, cfg.sft_max_steps


def _stopping_eval(model, tokenizer, problems: list[dict], target: float) -> tuple[int, int]:
    """(correct, total) greedy answers for the stop decision: the first SFT_SCREEN_PROBLEMS, then the rest of
    `problems` only if those reach half of `target`. Until SFT's jump the model gets a few percent right,
    so most evals decode a quarter of the problems; a stop still needs `target` on all of them."""
    def score(rows: list[dict]) -> tuple[int, int]:
        return greedy_answer_accuracy(model, tokenizer, rows, max_new_tokens=arith.MAX_NEW_TOKENS, batch_size=len(rows))

    correct, total = score(problems[:SFT_SCREEN_PROBLEMS])
    if correct < target / 2 * total or total == len(problems):
        return correct, total
    more, rest = score(problems[SFT_SCREEN_PROBLEMS:])
    return correct + more, total + rest
