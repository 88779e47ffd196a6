"""Metric names and their maths, defined once; docs/metrics.md mirrors this file.

Inputs are per-pair tensors already gathered from every rank, so means and quantiles are over the
global batch (or the logging window) and identical on every rank.
"""

from __future__ import annotations

import torch

QUANTILES = (0.1, 0.5, 0.9)


def pair_metrics(
    *,
    losses: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    reject_threshold: float,
    prefix: str = "",
) -> dict[str, float]:
    """All inputs (N,). Δw = policy_chosen − reference_chosen, Δl likewise for the rejected answer."""
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
        # MinorDPO's gate: the reject penalty is off for pairs whose rejected answer sits below τ.
        "stability/penalty_off_frac": (delta_l < reject_threshold).float().mean(),
        # The failure MinorDPO targets: the chosen answer pushed below the reference.
        "stability/chosen_below_ref_frac": (delta_w < 0).float().mean(),
    }
    quantiles = torch.tensor(QUANTILES, dtype=delta_w.dtype)
    for name, delta in (("delta_chosen", delta_w), ("delta_rejected", delta_l)):
        out[f"{name}/mean"] = delta.mean()
        for q, value in zip(QUANTILES, torch.quantile(delta.float(), quantiles.float()), strict=True):
            out[f"{name}/p{round(q * 100):02d}"] = value
    return {prefix + key: float(value) for key, value in out.items()}


# Per-step extras logged beside pair_metrics by the training loop, and the extra eval results.
STEP_METRICS = ("grad_norm", "lr", "perf/tokens_per_s", "perf/step_time_s", "stability/nonfinite_steps")
EVAL_METRICS = ("eval/answer_accuracy", "eval/n_pairs", "eval/n_problems")


def _all_names() -> frozenset[str]:
    zeros = torch.zeros(2)
    pair = pair_metrics(losses=zeros, policy_chosen_logps=zeros, policy_rejected_logps=zeros,
                        reference_chosen_logps=zeros, reference_rejected_logps=zeros, beta=1.0, reject_threshold=0.0)
    return frozenset(pair) | {f"eval/{k}" for k in pair} | set(STEP_METRICS) | set(EVAL_METRICS)


METRIC_NAMES = _all_names()  # every metric a run can report (a sweep's `metric` must be one)
