"""Invariants of mdpo_ray.training.losses, each pinned to a value derived by hand in its docstring.

Notation: Δw = policy_chosen − reference_chosen, Δl = policy_rejected − reference_rejected,
σ the logistic function, so −log σ(x) = log(1 + e^{−x}).
"""

import dataclasses
import inspect
import math

import pytest
import torch

from mdpo_ray.training import losses as L

SIGMOID_FAMILY = ("minor_dpo", "dpo", "dpop", "robust")
FULL_KNOBS = dict(beta=0.1, reject_threshold=-0.5, reject_weight=0.7, dpop_lambda=5.0, label_smoothing=0.1)


def pair(delta_w, delta_l, *, dtype=torch.float32, requires_grad=False):
    """Four (B,) log-prob tensors with the given Δw, Δl; references are nonzero so the subtraction
    is exercised. Returns (policy_chosen, policy_rejected, reference_chosen, reference_rejected)."""
    reference_chosen = torch.tensor([-20.0 - i for i in range(len(delta_w))], dtype=torch.float64)
    reference_rejected = torch.tensor([-30.0 - i for i in range(len(delta_l))], dtype=torch.float64)
    policy_chosen = reference_chosen + torch.tensor(delta_w, dtype=torch.float64)
    policy_rejected = reference_rejected + torch.tensor(delta_l, dtype=torch.float64)
    tensors = [t.to(dtype) for t in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def grads(fn, inputs, **knobs):
    """Gradients of the summed per-pair losses w.r.t. all four inputs (fresh leaves each call)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    fn(*leaves, **knobs).losses.sum().backward()
    return [t.grad for t in leaves]


def nll(x):
    """−log σ(x) = log(1 + e^{−x}), written out by hand."""
    return math.log1p(math.exp(-x))


# --- values at step 0 (policy == reference, Δw = Δl = 0) -------------------------------------------


@pytest.mark.parametrize("name", SIGMOID_FAMILY)
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_sigmoid_family_is_ln2_at_step_zero(name, beta):
    """Δw = Δl = 0 makes every logit 0 (DPOP's penalty λ·max(0, −0) = 0; MinorDPO's max(0, 0) = 0),
    so L = −log σ(0) = ln 2; for cDPO, −(1−ε)·ln ½ − ε·ln ½ = ln 2 for any ε."""
    out = L.LOSSES[name](*pair([0.0, 0.0], [0.0, 0.0]), beta=beta, label_smoothing=0.2)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)))


def test_ipo_and_hinge_at_step_zero():
    """IPO: (0 − 0 − 1/(2β))² = 1/(4β²) = 25 at β = 0.1. Hinge: relu(1 − β·0) = 1."""
    inputs = pair([0.0], [0.0])
    torch.testing.assert_close(L.ipo(*inputs, beta=0.1).losses, torch.tensor([1 / (4 * 0.1**2)]))
    torch.testing.assert_close(L.hinge(*inputs, beta=0.1).losses, torch.tensor([1.0]))


# --- MinorDPO hand values and its relation to DPO ----------------------------------------------------


def test_minor_dpo_hand_values():
    """β = 0.5. Δw = 1, Δl = 2: max(0, 2) = 2, L = −log σ(0.5·(1 − 2)) = log(1 + e^{0.5}).
    Δw = 1, Δl = −3: max(0, −3) = 0, the penalty is off, L = −log σ(0.5·1) = log(1 + e^{−0.5})."""
    out = L.minor_dpo(*pair([1.0, 1.0], [2.0, -3.0]), beta=0.5)
    expected = torch.tensor([math.log(1 + math.exp(0.5)), math.log(1 + math.exp(-0.5))])
    torch.testing.assert_close(out.losses, expected)


def test_minor_dpo_equals_dpo_while_rejected_above_reference():
    """Δl > 0 ⇒ max(0, Δl) = Δl, so MinorDPO's logit β(Δw − Δl) is DPO's: same values and gradients."""
    inputs = pair([0.3, -1.2, 2.0, 0.0], [0.1, 0.5, 4.0, 1e-3])
    torch.testing.assert_close(L.minor_dpo(*inputs, beta=0.1).losses, L.dpo(*inputs, beta=0.1).losses)
    for g_minor, g_dpo in zip(grads(L.minor_dpo, inputs, beta=0.1), grads(L.dpo, inputs, beta=0.1)):
        torch.testing.assert_close(g_minor, g_dpo)


def test_minor_dpo_differs_from_dpo_once_rejected_below_reference():
    """Δl = −2 < 0: MinorDPO's logit is βΔw, DPO's is β(Δw + 2) > βΔw, so MinorDPO's loss is larger
    (−log σ is decreasing): 0.1 → log(1+e^{−0.1}) vs log(1+e^{−0.3})."""
    inputs = pair([1.0], [-2.0])
    minor, dpo = L.minor_dpo(*inputs, beta=0.1).losses, L.dpo(*inputs, beta=0.1).losses
    torch.testing.assert_close(minor, torch.tensor([nll(0.1)]))
    torch.testing.assert_close(dpo, torch.tensor([nll(0.3)]))
    assert (minor > dpo).all()


@pytest.mark.parametrize(
    "tau, delta_l, rejected_grad_is_zero",
    [(0.0, -0.5, True), (0.0, -3.0, True), (0.0, 0.5, False), (-1.0, -0.5, False), (-1.0, -2.0, True)],
)
def test_rejected_gradient_switches_off_below_threshold(tau, delta_l, rejected_grad_is_zero):
    """L = −log σ(z), z = β(Δw − w·max(τ, Δl)). Below τ, max(τ, Δl) = τ is constant so ∂L/∂Δl = 0
    exactly; above τ, ∂L/∂Δl = β·w·σ(−z) > 0. The chosen side always has ∂L/∂Δw = −β·σ(−z) ≠ 0."""
    beta, delta_w = 0.1, 0.4
    g_pc, g_pr, _, _ = grads(L.minor_dpo, pair([delta_w], [delta_l]), beta=beta, reject_threshold=tau)
    z = beta * (delta_w - max(tau, delta_l))
    sigma_minus_z = 1 / (1 + math.exp(z))
    expected_rejected = 0.0 if rejected_grad_is_zero else beta * sigma_minus_z
    assert g_pr.item() == pytest.approx(expected_rejected, abs=0.0 if rejected_grad_is_zero else 1e-6)
    assert g_pc.item() == pytest.approx(-beta * sigma_minus_z, rel=1e-5)


def test_very_negative_threshold_is_dpo():
    """τ = −1e9 is below any Δl here, so max(τ, Δl) = Δl and L = −log σ(β(Δw − Δl)), DPO."""
    inputs = pair([0.3, -1.2, 2.0], [-5.0, 0.5, -40.0])
    out = L.minor_dpo(*inputs, beta=0.1, reject_threshold=-1e9)
    torch.testing.assert_close(out.losses, L.dpo(*inputs, beta=0.1).losses)


def test_zero_reject_weight_is_chosen_only():
    """w = 0 removes the reject term: L = −log σ(βΔw) whatever Δl is. β = 0.1, Δw = (2, −1)."""
    out = L.minor_dpo(*pair([2.0, -1.0], [3.0, -3.0]), beta=0.1, reject_weight=0.0)
    torch.testing.assert_close(out.losses, torch.tensor([nll(0.2), nll(-0.1)]))


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_first_step_matches_dpo(tau):
    """At step 0 policy == reference, so Δl = 0 ≥ τ and clamp passes the gradient through
    (at τ = 0 the boundary is taken as 'above'): MinorDPO's first update is exactly DPO's."""
    logps = torch.tensor([-12.0, -40.5, -7.25])
    inputs = [logps, logps - 3.0, logps, logps - 3.0]
    for g_minor, g_dpo in zip(
        grads(L.minor_dpo, inputs, beta=0.1, reject_threshold=tau), grads(L.dpo, inputs, beta=0.1)
    ):
        torch.testing.assert_close(g_minor, g_dpo)
        assert (g_minor != 0).all()


# --- baselines -----------------------------------------------------------------------------------------


def test_dpop_equals_dpo_when_chosen_above_reference():
    """Δw ≥ 0 ⇒ λ·max(0, −Δw) = 0, so DPOP's logit is DPO's."""
    inputs = pair([0.0, 0.5, 3.0], [1.0, -1.0, 2.0])
    torch.testing.assert_close(L.dpop(*inputs, beta=0.1).losses, L.dpo(*inputs, beta=0.1).losses)


def test_dpop_penalises_chosen_below_reference():
    """Δw = −1, Δl = −2, λ = 50, β = 0.1: max(0, −Δw) = 1, so the logit is
    β(Δw − Δl − λ) = β((1+λ)Δw − Δl) = 0.1·(−51 + 2) = −4.9, L = log(1 + e^{4.9}).
    ∂L/∂Δw = −β(1+λ)·σ(−z): both factors exceed DPO's −β·σ(−β(Δw − Δl)) in magnitude."""
    inputs = pair([-1.0], [-2.0])
    out = L.dpop(*inputs, beta=0.1, dpop_lambda=50.0)
    torch.testing.assert_close(out.losses, torch.tensor([nll(-4.9)]))
    g_dpop = grads(L.dpop, inputs, beta=0.1, dpop_lambda=50.0)[0]
    g_dpo = grads(L.dpo, inputs, beta=0.1)[0]
    torch.testing.assert_close(g_dpop, torch.tensor([-0.1 * 51 / (1 + math.exp(-4.9))]))
    assert (g_dpop.abs() > g_dpo.abs()).all()


def test_robust_reduces_to_dpo_and_hand_value():
    """ε = 0 is DPO. ε = 0.1, β = 1, Δw − Δl = 1: L = 0.9·log(1 + e^{−1}) + 0.1·log(1 + e^{1})."""
    inputs = pair([1.5], [0.5])
    torch.testing.assert_close(
        L.robust(*inputs, beta=1.0, label_smoothing=0.0).losses, L.dpo(*inputs, beta=1.0).losses
    )
    out = L.robust(*inputs, beta=1.0, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.9 * nll(1.0) + 0.1 * nll(-1.0)]))
    assert L.cdpo is L.robust


def test_ipo_hinge_sft_hand_values():
    """β = 0.5, Δw = 2, Δl = 0.5, h = 1.5. IPO: (1.5 − 1/(2·0.5))² = 0.25. Hinge: relu(1 − 0.75) = 0.25;
    at h = 3 the margin 1/β = 2 is met and hinge is 0. SFT: −policy_chosen_logps = −(−20 + 2) = 18."""
    inputs = pair([2.0, 3.0], [0.5, 0.0])
    torch.testing.assert_close(L.ipo(*inputs, beta=0.5).losses, torch.tensor([0.25, 4.0]))
    torch.testing.assert_close(L.hinge(*inputs, beta=0.5).losses, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(L.sft(*inputs, beta=0.5).losses, torch.tensor([18.0, 18.0]))


# --- the shared contract ---------------------------------------------------------------------------


def test_registry():
    """LOSSES has exactly the seven names; cdpo is a module alias only."""
    assert L.LOSS_NAMES == ("minor_dpo", "dpo", "dpop", "ipo", "robust", "hinge", "sft")
    assert tuple(L.LOSSES) == L.LOSS_NAMES
    assert "cdpo" not in L.LOSSES


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_shared_signature_shapes_and_rewards(name):
    """Every loss has MinorDPO's signature, takes the full knob set, returns (B,) losses, and its
    rewards are β·Δw, β·Δl, detached."""
    fn = L.LOSSES[name]
    assert inspect.signature(fn) == inspect.signature(L.minor_dpo)
    inputs = pair([0.5, -1.0, 2.0], [1.0, -2.0, 0.0], requires_grad=True)
    out = fn(*inputs, **FULL_KNOBS)
    assert isinstance(out, L.LossOutput)
    assert out.losses.shape == (3,) and out.losses.requires_grad
    torch.testing.assert_close(out.chosen_rewards, 0.1 * torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(out.rejected_rewards, 0.1 * torch.tensor([1.0, -2.0, 0.0]))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.losses = out.losses


@pytest.mark.parametrize("name", L.LOSS_NAMES)
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_nonpositive_beta_rejected(name, beta):
    with pytest.raises(ValueError, match="beta"):
        L.LOSSES[name](*pair([0.0], [0.0]), beta=beta)


@pytest.mark.parametrize(
    "fn, knob, value",
    [
        (L.minor_dpo, "reject_threshold", 0.5),
        (L.minor_dpo, "reject_weight", -1.0),
        (L.dpop, "dpop_lambda", -1.0),
        (L.robust, "label_smoothing", 0.5),
        (L.robust, "label_smoothing", -0.1),
    ],
)
def test_bad_knobs_raise_naming_the_knob(fn, knob, value):
    with pytest.raises(ValueError, match=knob):
        fn(*pair([0.0], [0.0]), beta=0.1, **{knob: value})


@pytest.mark.parametrize("name", L.LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_finite_across_dtypes_and_large_margins(name, dtype, scale):
    """logsigmoid is stable at |βΔ| ~ 1e3 (a naive log(sigmoid(x)) gives −inf); IPO's square of 1e4
    and SFT's raw log-prob stay far below bf16's max (~3e38). Gradients must be finite too."""
    inputs = pair([scale, -scale], [-scale, scale], dtype=dtype)
    out = L.LOSSES[name](*inputs, **FULL_KNOBS)
    assert out.losses.dtype == dtype and out.losses.shape == (2,)
    assert torch.isfinite(out.losses).all()
    for g in grads(L.LOSSES[name], inputs, **FULL_KNOBS):
        assert g is None or torch.isfinite(g).all()


# --- loss.nll_weight: the Iterative RPO NLL term on the chosen answer, for any loss ----------------


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_nll_weight_zero_changes_nothing_bitwise(name):
    """λ = 0 hands back the loss's own output: the same tensors, not merely equal values."""
    out = L.LOSSES[name](*pair([0.3, -1.2], [0.8, -0.4]), **FULL_KNOBS)
    same = L.with_chosen_nll(out, torch.tensor([1.5, 2.5]), nll_weight=0.0)
    assert same is out
    assert torch.equal(same.losses, out.losses)


@pytest.mark.parametrize("name", L.LOSS_NAMES)
@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_nll_weight_adds_exactly_weight_times_the_chosen_nll(name, weight):
    """L' = L + λ·NLL per pair; the rewards are the loss's own. NLL (2.0, 0.25) at λ = 0.5 adds (1.0, 0.125)."""
    inputs = pair([0.3, -1.2], [0.8, -0.4])
    out = L.LOSSES[name](*inputs, **FULL_KNOBS)
    chosen_nll = torch.tensor([2.0, 0.25])
    plus = L.with_chosen_nll(out, chosen_nll, nll_weight=weight)
    torch.testing.assert_close(plus.losses - out.losses, weight * chosen_nll)
    assert torch.equal(plus.chosen_rewards, out.chosen_rewards)
    assert torch.equal(plus.rejected_rewards, out.rejected_rewards)


def test_nll_term_gradient_reaches_the_chosen_log_prob():
    """With the token-mean NLL −logπ(y_w)/n, d(λ·NLL)/d logπ(y_w) = −λ/n on top of the loss's own
    gradient; here DPO at step 0 (dL/dΔw = −β/2 = −0.05), λ = 2, n = 4: −0.05 − 0.5 = −0.55."""
    pc, pr, rc, rr = pair([0.0], [0.0], requires_grad=True)
    out = L.with_chosen_nll(L.dpo(pc, pr, rc, rr, beta=0.1), -pc / 4, nll_weight=2.0)
    out.losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.55]))


def test_negative_nll_weight_raises():
    out = L.dpo(*pair([0.0], [0.0]), beta=0.1)
    with pytest.raises(ValueError, match="nll_weight"):
        L.with_chosen_nll(out, torch.tensor([1.0]), nll_weight=-1.0)
