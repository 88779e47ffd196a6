"""Metric names, their meanings and their maths, defined once: the training loop logs exactly the names of
GLOSSARY, a sweep's `metric` must be one of them, and docs/metrics.md is generated from it
(mdpo_ray.reference_pages).

Inputs are per-pair tensors already gathered from every rank, so means and quantiles are over the
global batch (or the logging window) and identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

QUANTILES = (0.1, 0.5, 0.9)
EVAL_PREFIX = "eval/"  # the pair metrics of the held-out pairs, and the generation results
EVAL_START_PREFIX = "eval_start/"  # in Ray's reports only: the held-out metrics before training, without eval/


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    # pair: from pair_metrics, on training batches and, as eval/<name>, on the held-out pairs; step: per
    # training log step; eval: held-out only; data_tag: a run tag, one number per run (not a metric); round: on an
    # iterate run's parent MLflow run, one point per round (step = the round's index, from 0).
    kind: Literal["pair", "step", "eval", "data_tag", "round"]


def _quantiles(name: str, symbol: str, gloss: str) -> list[Metric]:
    return [Metric(f"{name}/mean", f"mean {symbol} over the pairs: {gloss}", "pair")] + [
        Metric(f"{name}/p{round(q * 100):02d}", f"{round(q * 100)}th percentile of {symbol} over the pairs", "pair")
        for q in QUANTILES]


_PAIR = [
    Metric("loss", "mean per-pair loss of the configured `loss.name` (plus `loss.nll_weight` times the chosen "
           "answer's token-mean NLL when that is > 0)", "pair"),
    Metric("rewards/chosen", "β·mean(Δw): the implicit reward of the chosen answers", "pair"),
    Metric("rewards/rejected", "β·mean(Δl): the implicit reward of the rejected answers", "pair"),
    Metric("rewards/margins", "β·mean(Δw − Δl)", "pair"),
    Metric("rewards/accuracies", "fraction of pairs with Δw > Δl (0 at step 0, where Δw = Δl = 0)", "pair"),
    Metric("logps/chosen", "mean policy log-prob of the chosen completion (summed over its tokens; length-averaged "
           "with `loss.average_log_prob`)", "pair"),
    Metric("logps/rejected", "mean policy log-prob of the rejected completion", "pair"),
    Metric("logps/ref_chosen", "mean reference log-prob of the chosen completion", "pair"),
    Metric("logps/ref_rejected", "mean reference log-prob of the rejected completion", "pair"),
    Metric("logits/chosen", "mean policy logit over the chosen completion's positions and the vocabulary, per pair, "
           "then over the pairs (TRL's name; TRL averages over the batch's tokens)", "pair"),
    Metric("logits/rejected", "the same for the rejected completion", "pair"),
    # MinorDPO's gate: the reject penalty is off for pairs whose rejected answer sits below τ.
    Metric("stability/penalty_off_frac", "fraction of pairs whose MinorDPO reject penalty is off (Δl < τ, "
           "`loss.reject_threshold`)", "pair"),
    # The failure MinorDPO targets: the chosen answer pushed below the reference.
    Metric("stability/chosen_below_ref_frac", "fraction of pairs whose chosen answer fell below the reference "
           "(Δw < 0)", "pair"),
    *_quantiles("delta_chosen", "Δw", "the chosen answer's log-prob drift from the reference (nats)"),
    *_quantiles("delta_rejected", "Δl", "the rejected answer's log-prob drift from the reference (nats)"),
]

# Data-loading counts, run tags data/train_<count> and data/eval_<count> (mdpo_ray.data.pairs.DataStats.counts).
_DATA_COUNTS = {
    "rows": "rows read from `data.train` (`data.eval`)",
    "kept": "pairs kept after validation and truncation",
    "bad_rows": "rows dropped as bad (missing field, wrong type, empty completion, chosen = rejected)",
    "prompt_too_long": "pairs dropped because the prompt alone has `data.max_length` tokens or more",
    "truncated": "kept pairs whose completions were cut to fit `data.max_length`",
}

GLOSSARY: tuple[Metric, ...] = (
    *_PAIR,
    Metric("grad_norm", "global gradient norm before clipping, mean over the steps since the last log", "step"),
    Metric("lr", "learning rate of the logged step", "step"),
    Metric("perf/tokens_per_s", "non-padding tokens (chosen + rejected) per second of step time, all ranks", "step"),
    Metric("perf/step_time_s", "mean wall time of a training step (seconds)", "step"),
    Metric("stability/nonfinite_steps", "steps skipped so far because the loss or the gradient was not finite",
           "step"),
    Metric("eval/answer_accuracy", "greedy decoding on `data.generation_eval`: fraction of problems whose integer "
           "after `####` is right", "eval"),
    Metric("eval/n_pairs", "held-out pairs evaluated (each rank takes an equal share; up to world−1 are left out)",
           "eval"),
    Metric("eval/n_problems", "held-out problems decoded (shared out the same way)", "eval"),
    *(Metric(f"data/{{train,eval}}_{count}", meaning, "data_tag") for count, meaning in _DATA_COUNTS.items()),
    Metric("iterate/pairs", "pairs the round trained on: one per sampled prompt with a correct and an incorrect "
           "completion", "round"),
    Metric("iterate/prompts_all_correct", "the round's prompts whose every completion was correct (skipped)", "round"),
    Metric("iterate/prompts_all_wrong", "the round's prompts with no correct completion (skipped)", "round"),
    Metric("iterate/sample_accuracy", "fraction of the round's sampled completions the verifier called correct "
           "(the round's start policy at `iterate.temperature`)", "round"),
    Metric("iterate/answer_accuracy", "`eval/answer_accuracy` after the round's training (greedy, on "
           "`data.generation_eval`). The parent also logs `eval/answer_accuracy` itself, at step 0 (round 0's start) "
           "and after round r at step (r+1)·`optim.max_steps`, the steps trained so far: a sweep ranks an iterate "
           "trial by it and compares it with a single run of as many steps", "round"),
)
PAIR_METRICS = tuple(m.name for m in GLOSSARY if m.kind == "pair")
# Every metric a run logs (training, eval/<pair metric>, eval-only): a sweep's `metric` must be one.
METRIC_NAMES = frozenset(m.name for m in GLOSSARY if m.kind in ("pair", "step", "eval")) | {
    EVAL_PREFIX + name for name in PAIR_METRICS}


def data_tags(split: str, counts: dict[str, int]) -> dict[str, str]:
    """Data-loading counts as run tags, `{"kept": 7, ...}` -> `{"data/train_kept": "7", ...}`: the glossary's counts."""
    if counts.keys() != _DATA_COUNTS.keys():
        raise KeyError(f"data counts {sorted(counts)} differ from metrics.GLOSSARY's {sorted(_DATA_COUNTS)}")
    return {f"data/{split}_{count}": str(value) for count, value in counts.items()}


def pair_metrics(
    *,
    losses: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    beta: float,
    reject_threshold: float,
    prefix: str = "",
) -> dict[str, float]:
    """All inputs (N,). Δw = policy_chosen − reference_chosen, Δl likewise for the rejected answer; the logits
    are each pair's mean policy logit over its completion positions and the vocabulary (logps.py).
    Returns exactly PAIR_METRICS, each name with `prefix`."""
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    out = {
        "loss": losses.mean(),
        "rewards/chosen": beta * delta_w.mean(),
        "rewards/rejected": beta * delta_l.mean(),
        "rewards/margins": beta * (delta_w - delta_l).mean(),
        "rewards/accuracies": (delta_w > delta_l).float().mean(),
        "logps/chosen": policy_chosen_logps.mean(),
        "logps/rejected": policy_rejected_logps.mean(),
        "logps/ref_chosen": reference_chosen_logps.mean(),
        "logps/ref_rejected": reference_rejected_logps.mean(),
        "logits/chosen": policy_chosen_logits.mean(),
        "logits/rejected": policy_rejected_logits.mean(),
        "stability/penalty_off_frac": (delta_l < reject_threshold).float().mean(),
        "stability/chosen_below_ref_frac": (delta_w < 0).float().mean(),
    }
    quantiles = torch.tensor(QUANTILES, dtype=delta_w.dtype)
    for name, delta in (("delta_chosen", delta_w), ("delta_rejected", delta_l)):
        out[f"{name}/mean"] = delta.mean()
        for q, value in zip(QUANTILES, torch.quantile(delta.float(), quantiles.float()), strict=True):
            out[f"{name}/p{round(q * 100):02d}"] = value
    assert out.keys() == set(PAIR_METRICS), set(out) ^ set(PAIR_METRICS)  # computed == documented
    return {prefix + name: float(out[name]) for name in PAIR_METRICS}
