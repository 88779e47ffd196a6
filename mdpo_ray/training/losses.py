"""Preference losses: MinorDPO and its baselines, as pure functions of four log-prob tensors.

MinorDPO (Xie et al., arXiv 2408.09834) changes one thing in DPO: the rejected answer is pushed
down only while the policy still rates it above the reference. With Δw = log π(y_w) − log π_ref(y_w)
and Δl = log π(y_l) − log π_ref(y_l), DPO minimises −log σ(β(Δw − Δl)), which keeps lowering Δl
without bound and tends to drag log π(y_w) down with it; MinorDPO minimises
−log σ(β(Δw − max(0, Δl))), so the rejected gradient switches off once Δl < 0. Every loss here
shares one signature, ``fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps, *, beta, reject_threshold, reject_weight, dpop_lambda, label_smoothing)``,
takes (B,) summed completion log-probs, ignores the knobs that are not its own, and returns a
``LossOutput`` of per-pair losses and detached implicit rewards, so switching losses is a name.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossOutput:
    """Per-pair losses and the implicit DPO rewards used for monitoring.

    losses:           (B,) per-pair loss; the caller reduces (mean over pairs, then across ranks).
    chosen_rewards:   (B,) β·Δw, detached.
    rejected_rewards: (B,) β·Δl, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the KL-penalty strength, typically 0.01-0.5); got {beta}")


def _output(losses: torch.Tensor, delta_w: torch.Tensor, delta_l: torch.Tensor, beta: float) -> LossOutput:
    return LossOutput(losses, (beta * delta_w).detach(), (beta * delta_l).detach())


def minor_dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """MinorDPO (arXiv 2408.09834): L = −log σ(β·(Δw − w·max(τ, Δl))).

    The paper is τ = 0, w = 1: L = −log σ(β(Δw − max(0, Δl))). τ = reject_threshold ≤ 0 lets the
    rejected answer sink to Δl = τ before its gradient stops (τ → −∞ recovers DPO); w =
    reject_weight ≥ 0 scales the reject penalty (w = 0 leaves −log σ(βΔw), chosen-only).
    Uses beta, reject_threshold, reject_weight; ignores dpop_lambda, label_smoothing.
    Inputs (B,) summed completion log-probs; returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    if reject_threshold > 0:
        raise ValueError(
            "reject_threshold must be <= 0 (tau = 0 is the MinorDPO paper, more negative "
            f"approaches DPO); got {reject_threshold}"
        )
    if reject_weight < 0:
        raise ValueError(f"reject_weight must be >= 0 (1 is the MinorDPO paper); got {reject_weight}")
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    # clamp, not maximum: its gradient w.r.t. Δl is exactly 0 below τ and passes through at Δl = τ,
    # so at step 0 (Δl = 0 = τ) the first update is exactly DPO's.
    reject_penalty = reject_weight * torch.clamp(delta_l, min=reject_threshold)
    losses = -F.logsigmoid(beta * (delta_w - reject_penalty))
    return _output(losses, delta_w, delta_l, beta)


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO, sigmoid form (Rafailov et al. 2023, eq. 7): L = −log σ(β(Δw − Δl)).

    Uses beta only. Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (delta_w - delta_l))
    return _output(losses, delta_w, delta_l, beta)


def dpop(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO-Positive (Smaug, Pal et al. 2024, arXiv 2402.13228):
    L = −log σ(β(Δw − Δl − λ·max(0, −Δw))).

    The extra term penalises the chosen log-prob falling below the reference — DPOP's answer to the
    same failure MinorDPO targets from the rejected side. Uses beta, dpop_lambda (λ ≥ 0, the paper
    uses 50); ignores the rest. Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    if dpop_lambda < 0:
        raise ValueError(f"dpop_lambda must be >= 0 (0 is DPO, the Smaug paper uses 50); got {dpop_lambda}")
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    chosen_penalty = dpop_lambda * torch.clamp(-delta_w, min=0.0)
    losses = -F.logsigmoid(beta * (delta_w - delta_l - chosen_penalty))
    return _output(losses, delta_w, delta_l, beta)


def ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036; β plays their τ): L = (Δw − Δl − 1/(2β))².

    IPO is defined on length-averaged log-probs; this function does not average, the caller passes
    whichever it wants. Uses beta only. Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    losses = (delta_w - delta_l - 1 / (2 * beta)) ** 2
    return _output(losses, delta_w, delta_l, beta)


def robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Conservative DPO (cDPO, Mitchell 2023 note; label-smoothed DPO), h = Δw − Δl:
    L = −(1 − ε)·log σ(βh) − ε·log σ(−βh).

    ε = label_smoothing ∈ [0, 0.5) is the assumed probability that a preference label is flipped;
    ε = 0 is DPO. Uses beta, label_smoothing. Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(
            "label_smoothing must be in [0, 0.5) (0 is DPO, 0.5 would ignore the labels); "
            f"got {label_smoothing}"
        )
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    logits = beta * (delta_w - delta_l)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _output(losses, delta_w, delta_l, beta)


cdpo = robust


def hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425, as in the DPO reference code):
    L = relu(1 − β(Δw − Δl)).

    Uses beta only. Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1 - beta * (delta_w - delta_l))
    return _output(losses, delta_w, delta_l, beta)


def sft(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    reject_threshold: float = 0.0,
    reject_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SFT baseline: NLL of the chosen answer, L = −log π(y_w); the rejected answer is unused.

    With summed log-probs this is the sequence NLL; pass length-averaged log-probs for token-mean
    NLL. Rewards are still β·Δw, β·Δl so runs are monitored on the same axes. Uses beta (rewards
    only). Inputs (B,); returns LossOutput with (B,) fields.
    """
    _check_beta(beta)
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    return _output(-policy_chosen_logps, delta_w, delta_l, beta)


def with_chosen_nll(out: LossOutput, chosen_nll: torch.Tensor, *, nll_weight: float) -> LossOutput:
    """Any loss plus an NLL term on the chosen answer: L + λ·NLL(y_w), λ = nll_weight.

    The Iterative RPO recipe (Pang et al. 2024, arXiv 2404.19733, eq. 3) adds the chosen answer's
    length-normalised NLL to DPO so that the chosen log-prob keeps rising while the margin grows.
    chosen_nll: (B,) per-pair token-mean NLL of the chosen completion, −(1/|y_w|)·Σ_t log π(y_w,t | …)
    (mdpo_ray.training.logps.chosen_token_mean_nll). λ = 0 returns `out` itself, so the default
    changes nothing, bit for bit. The rewards are unchanged.
    """
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0 (0: no NLL term; Iterative RPO uses 1); got {nll_weight}")
    if nll_weight == 0:
        return out
    return replace(out, losses=out.losses + nll_weight * chosen_nll)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "minor_dpo": minor_dpo,
    "dpo": dpo,
    "dpop": dpop,
    "ipo": ipo,
    "robust": robust,
    "hinge": hinge,
    "sft": sft,
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
