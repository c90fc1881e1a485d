"""Closed-form optima of the ∇-DB conditions (docs/method.md §2.2–2.3) on linear-Gaussian chains.

The residuals of ``nabla_db_residuals`` must vanish at the exact optimum and not elsewhere. All scores are computed
with gflowdiff's own ``forward_score`` / ``reverse_score`` / ``backward_kernel_scores`` (means as autograd functions of
x), so these tests also check that the objective's building blocks fit together with the right signs.
"""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.math import backward_kernel_scores, forward_score, per_sample, reverse_score
from gflowdiff.objectives.gradient_db.math import guess_weight, mean_square, nabla_db_residuals

DTYPE = torch.float64
BATCH, SHAPE = 3, (2, 3, 3)


def scores(
    x: torch.Tensor, x_next: torch.Tensor, mean: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_{x'} log N(x'; μ(x), σ²I), ∇_x log N(x'; μ(x), σ²I)) for a mean built from ``x`` with autograd."""
    std = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    return forward_score(x_next, mean, std), reverse_score(x, x_next, mean, std)


def residual_transition(
    x: torch.Tensor, a: float, sigma: float, v_next: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step x → x' of the tilted chain; returns (x', policy fwd, policy rev, prior fwd, prior rev) scores."""
    x = x.detach().requires_grad_(True)
    prior_mean = a * x  # pretrained P_F^#(x'|x) = N(a·x, σ²I)
    policy_mean = a * x + sigma**2 * v_next  # tilted P_F(x'|x) = N(a·x + σ²·v', σ²I)
    x_next = (policy_mean + sigma * z).detach()
    policy_fwd, policy_rev = scores(x, x_next, policy_mean, sigma)
    prior_fwd, prior_rev = scores(x, x_next, prior_mean, sigma)
    return x_next, policy_fwd, policy_rev, prior_fwd, prior_rev


# ---- small pure helpers ---------------------------------------------------------------------------------------------
def test_guess_weight_modes():
    abar = torch.tensor([0.0058, 0.25, 0.9983])
    # alpha_bar: γ = (√ᾱ)² = ᾱ (the reference's 'squared' default)
    torch.testing.assert_close(guess_weight(abar, "alpha_bar"), abar)
    # sqrt_alpha_bar: γ = √ᾱ; √0.25 = 0.5
    assert guess_weight(abar, "sqrt_alpha_bar")[1].item() == pytest.approx(0.5)
    # one / off: constant 1 / 0
    assert guess_weight(abar, "one").tolist() == [1.0, 1.0, 1.0]
    assert guess_weight(abar, "off").tolist() == [0.0, 0.0, 0.0]


def test_mean_square_is_a_mean_not_a_sum():
    x = torch.full((2, 4, 8, 8), 3.0)
    # every element squares to 9; the mean over 512 elements is 9 (a sum would be 4608)
    assert mean_square(x).item() == 9.0


def test_residual_signs_and_missing_reverse():
    ones = torch.ones(2)
    forward, reverse = nabla_db_residuals(5 * ones, 2 * ones, 1 * ones, 7 * ones, 3 * ones, 4 * ones)
    # forward = policy − prior − flow' = 5 − 2 − 1 = 2; reverse = policy − prior + flow = 7 − 3 + 4 = 8
    assert forward.tolist() == [2.0, 2.0] and reverse.tolist() == [8.0, 8.0]
    # without a reverse policy score (w_B = 0) there is no reverse residual
    assert nabla_db_residuals(5 * ones, 2 * ones, 1 * ones, None, None, None)[1] is None


# ---- (a) residual ∇-DB: prior = pretrained P_F^# ---------------------------------------------------------------------
# Chain with pretrained P_F^#(x'|x) = N(a·x, σ²I) and terminal log-reward r(x_T) = w·x_T, target ∝ P^#(x_T)·e^{β r}.
# Residual flow: F̃(x_T) = e^{β w·x_T}; one step back F̃(x) = ∫ P^#(x'|x) e^{v'·x'} dx' = e^{a v'·x + σ²|v'|²/2}, so
# ∇ log F̃(x) = a·v' (v' = ∇ log F̃(x'), a constant vector), and the tilted policy P^#(x'|x)·F̃(x')/F̃(x) completes the
# square to N(a·x + σ²·v', σ²I).
def test_residual_nabla_db_vanishes_at_the_tilted_policy():
    torch.manual_seed(0)
    a, sigma = 0.9, 0.3
    x = torch.randn(BATCH, *SHAPE, dtype=DTYPE)
    v_next = torch.randn(SHAPE, dtype=DTYPE).expand(BATCH, *SHAPE)  # ∇ log F̃(x'), the same for every state
    v_cur = a * v_next  # ∇ log F̃(x) = a·v'
    z = torch.randn_like(x)
    _, policy_fwd, policy_rev, prior_fwd, prior_rev = residual_transition(x, a, sigma, v_next, z)

    forward, reverse = nabla_db_residuals(policy_fwd, prior_fwd, v_next, policy_rev, prior_rev, v_cur)
    # forward: −(x' − ax − σ²v')/σ² + (x' − ax)/σ² = v' → v' − v' = 0
    torch.testing.assert_close(forward, torch.zeros_like(forward), atol=1e-12, rtol=0)
    # reverse: a(x' − ax − σ²v')/σ² − a(x' − ax)/σ² = −a·v' → −a v' + a v' = 0
    torch.testing.assert_close(reverse, torch.zeros_like(reverse), atol=1e-12, rtol=0)


def test_residual_nabla_db_detects_a_wrong_flow_or_policy():
    torch.manual_seed(0)
    a, sigma, delta = 0.9, 0.5, 0.1
    x = torch.randn(BATCH, *SHAPE, dtype=DTYPE)
    v_next = torch.randn(SHAPE, dtype=DTYPE).expand(BATCH, *SHAPE)
    z = torch.randn_like(x)
    _, policy_fwd, policy_rev, prior_fwd, prior_rev = residual_transition(x, a, sigma, v_next, z)

    # flow scores off by +δ everywhere: forward residual −δ, reverse +δ → mean square δ² = 0.01 each
    forward, reverse = nabla_db_residuals(
        policy_fwd, prior_fwd, v_next + delta, policy_rev, prior_rev, a * v_next + delta
    )
    assert mean_square(forward).item() == pytest.approx(delta**2)
    assert mean_square(reverse).item() == pytest.approx(delta**2)

    # policy mean off by +δ (same x'): forward score moves by +δ/σ² = 0.4, reverse by −aδ/σ² = −0.36
    x_next = (a * x + sigma**2 * v_next + sigma * z).detach()  # the unshifted sample, so only μ changes
    x_grad = x.clone().requires_grad_(True)
    policy_fwd, policy_rev = scores(x_grad, x_next, a * x_grad + sigma**2 * v_next + delta, sigma)
    prior_fwd, prior_rev = scores(x_grad, x_next, a * x_grad, sigma)
    forward, reverse = nabla_db_residuals(policy_fwd, prior_fwd, v_next, policy_rev, prior_rev, a * v_next)
    # (δ/σ²)² = 0.4² = 0.16 and (aδ/σ²)² = 0.36² = 0.1296
    assert mean_square(forward).item() == pytest.approx(0.16)
    assert mean_square(reverse).item() == pytest.approx(0.1296)


def test_residual_nabla_db_three_step_chain():
    torch.manual_seed(0)
    beta = 2.0
    coefficients = [(1.1, 0.4), (0.95, 0.3), (0.8, 0.2)]  # (a_k, σ_k) of step k: x_k → x_{k+1}, k = 0, 1, 2
    w = torch.randn(SHAPE, dtype=DTYPE)
    # terminal condition ∇ log F̃(x_3) = β·∇r = β·w; then v_k = a_k·v_{k+1} going backwards
    v = [None, None, None, beta * w]
    for k in reversed(range(3)):
        v[k] = coefficients[k][0] * v[k + 1]

    x = torch.zeros(BATCH, *SHAPE, dtype=DTYPE)  # a single source state x_0 = 0
    for k, (a, sigma) in enumerate(coefficients):
        v_next, v_cur = v[k + 1].expand_as(x), v[k].expand_as(x)
        x, policy_fwd, policy_rev, prior_fwd, prior_rev = residual_transition(x, a, sigma, v_next, torch.randn_like(x))
        forward, reverse = nabla_db_residuals(policy_fwd, prior_fwd, v_next, policy_rev, prior_rev, v_cur)
        # every transition satisfies both conditions; the last one's flow_next is the terminal β·∇r(x_T)
        assert mean_square(forward).item() < 1e-20 and mean_square(reverse).item() < 1e-20

    # consistency of the propagation: from x_0 = 0 the tilted chain's terminal mean is S_T·β·w, where
    # S_T = Σ_k σ_k² Π_{j>k} a_j² is the pretrained terminal variance (tilting N(0, S_T) by e^{βw·x} adds S_T·βw)
    mean = torch.zeros(SHAPE, dtype=DTYPE)
    for k, (a, sigma) in enumerate(coefficients):
        mean = a * mean + sigma**2 * v[k + 1]
    s_t = 0.4**2 * 0.95**2 * 0.8**2 + 0.3**2 * 0.8**2 + 0.2**2
    torch.testing.assert_close(mean, s_t * beta * w)


# ---- (b) non-residual ∇-DB: prior = backward kernel P_B --------------------------------------------------------------
# P_B(x|x') = N(c·x', b·I) with c² = ᾱ_t/ᾱ_prev, b = 1 − c²; flow at the next state F(x') = N(0, v_p·I).
# P_F(x'|x) ∝ P_B(x|x')·F(x'): precision 1/s² = c²/b + 1/v_p, mean s²·c·x/b (complete the square in x').
# F(x) = ∫ P_B(x|x') F(x') dx' = N(0, c²·v_p + b), so ∇ log F(x) = −x/(c²v_p + b) and ∇ log F(x') = −x'/v_p.
ABAR_T, ABAR_PREV, V_P = 0.6, 0.9, 1.7
C2 = ABAR_T / ABAR_PREV  # c² = 2/3
B = 1 - C2  # b = 1/3
S2 = 1 / (C2 / B + 1 / V_P)  # s² = 1/(2 + 1/1.7)


def nondb_terms(mean_scale: float = 1.0):
    torch.manual_seed(0)
    c = C2**0.5
    x = torch.randn(BATCH, *SHAPE, dtype=DTYPE, requires_grad=True)
    policy_mean = mean_scale * S2 * c * x / B
    x_next = (policy_mean + S2**0.5 * torch.randn_like(x)).detach()
    policy_fwd, policy_rev = scores(x, x_next, policy_mean, S2**0.5)
    abar_t = torch.full((BATCH,), ABAR_T, dtype=DTYPE)
    abar_prev = torch.full((BATCH,), ABAR_PREV, dtype=DTYPE)
    prior_fwd, prior_rev = backward_kernel_scores(x.detach(), x_next, abar_t, abar_prev)
    return x.detach(), x_next, policy_fwd, policy_rev, prior_fwd, prior_rev


def test_nabla_db_vanishes_at_the_exact_gaussian_policy():
    x, x_next, policy_fwd, policy_rev, prior_fwd, prior_rev = nondb_terms()
    flow_next = -x_next / V_P  # ∇ log N(x'; 0, v_p)
    flow_cur = -x / (C2 * V_P + B)  # ∇ log N(x; 0, c²v_p + b)
    forward, reverse = nabla_db_residuals(policy_fwd, prior_fwd, flow_next, policy_rev, prior_rev, flow_cur)
    # forward: x'·(−1/s² + c²/b + 1/v_p) = 0 by the definition of s²
    torch.testing.assert_close(forward, torch.zeros_like(forward), atol=1e-12, rtol=0)
    # reverse: x·(1/b − s²c²/b² − 1/(c²v_p + b)) = 0 since s² = b·v_p/(c²v_p + b)
    torch.testing.assert_close(reverse, torch.zeros_like(reverse), atol=1e-12, rtol=0)


def test_nabla_db_detects_a_wrong_flow_or_policy():
    x, x_next, policy_fwd, policy_rev, prior_fwd, prior_rev = nondb_terms()
    # flow at x with the wrong variance (v_p, not c²v_p + b): reverse residual x·(1/(c²v_p + b) − 1/v_p) ≠ 0
    forward, reverse = nabla_db_residuals(policy_fwd, prior_fwd, -x_next / V_P, policy_rev, prior_rev, -x / V_P)
    assert mean_square(forward).item() < 1e-20
    expected = (1 / V_P - 1 / (C2 * V_P + B)) ** 2 * mean_square(x).item()
    assert mean_square(reverse).item() == pytest.approx(expected)
    assert expected > 1e-3  # (1/1.4667 − 1/1.7)² ≈ 0.0087, times mean x² ≈ 1

    # policy mean scaled by 1.5: the forward residual is 0.5·s²c·x/b/s² = 0.5·c·x/b ≠ 0
    x, x_next, policy_fwd, policy_rev, prior_fwd, prior_rev = nondb_terms(mean_scale=1.5)
    forward, _ = nabla_db_residuals(policy_fwd, prior_fwd, -x_next / V_P, policy_rev, prior_rev, -x / (C2 * V_P + B))
    torch.testing.assert_close(forward, 0.5 * C2**0.5 * x / B)


def test_variance_weighting_scales_residuals_by_sigma_squared_and_keeps_the_optimum():
    from gflowdiff.objectives.gradient_db.math import transition_weight

    std = torch.tensor([0.5, 0.1])
    # σ² per transition: 0.25 and 0.01; "none" is 1.
    torch.testing.assert_close(transition_weight(std, "variance"), torch.tensor([0.25, 0.01]))
    torch.testing.assert_close(transition_weight(std, "none"), torch.ones(2))
    zero = torch.zeros(2, 1, 2, 2)
    assert torch.count_nonzero(per_sample(transition_weight(std, "variance"), zero) * zero) == 0  # 0 stays 0
