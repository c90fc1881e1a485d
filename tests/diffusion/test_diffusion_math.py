"""diffusion/math.py against diffusers' DDIMScheduler (the sampler SD-1.5 uses) and against autograd /
torch.distributions.

Notation (docs/method.md §1): x is the noisier state at timestep t, x' the cleaner one at t − Δ; ᾱ is
``alphas_cumprod``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from gflowdiff.diffusion.math import (
    alpha_bar,
    backward_kernel_scores,
    ddim_mean,
    ddim_std,
    forward_score,
    gaussian_log_prob,
    per_sample,
    predicted_x0,
    previous_timesteps,
    reverse_score,
)

NUM_TRAIN_TIMESTEPS = 1000
NUM_INFERENCE_STEPS = 50
SHAPE = (4, 8, 8)  # one small latent (C, H, W)


@pytest.fixture(scope="module")
def scheduler() -> DDIMScheduler:
    """SD-1.5's scheduler config (scaled_linear β from 0.00085 to 0.012, ᾱ_prev of the last step = ᾱ_0)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    return scheduler


def schedule_terms(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_prev) for a (B,) tensor of timesteps, through gflowdiff's functions only."""
    final = float(scheduler.final_alpha_cumprod)
    t_prev = previous_timesteps(timesteps, NUM_TRAIN_TIMESTEPS, NUM_INFERENCE_STEPS)
    return alpha_bar(scheduler.alphas_cumprod, timesteps, final), alpha_bar(scheduler.alphas_cumprod, t_prev, final)


# ---- schedule lookups -----------------------------------------------------------------------------------------------
def test_previous_timesteps_match_the_scheduler_grid(scheduler):
    timesteps = scheduler.timesteps
    # leading spacing with steps_offset 1: t = 981, 961, …, 21, 1 and Δ = 1000 // 50 = 20
    assert timesteps[0].item() == 981 and timesteps[-1].item() == 1 and len(timesteps) == NUM_INFERENCE_STEPS
    t_prev = previous_timesteps(timesteps, NUM_TRAIN_TIMESTEPS, NUM_INFERENCE_STEPS)
    # every step lands on the next grid point; the last one on 1 − 20 = −19 (the "step after the last")
    assert torch.equal(t_prev[:-1], timesteps[1:])
    assert t_prev[-1].item() == -19


def test_alpha_bar_lookup_and_final_value(scheduler):
    final = float(scheduler.final_alpha_cumprod)
    # set_alpha_to_one=False: final_alpha_cumprod = ᾱ_0 = 1 − β_0 = 1 − 0.00085 = 0.99915
    assert final == pytest.approx(0.99915, abs=1e-6)
    timesteps = torch.tensor([981, 500, 1, 0, -19])
    values = alpha_bar(scheduler.alphas_cumprod, timesteps, final)
    # non-negative t: a plain lookup of alphas_cumprod[t]
    assert torch.equal(values[:4], scheduler.alphas_cumprod[timesteps[:4]])
    # negative t: final_alpha_cumprod, as DDIMScheduler.step uses when prev_timestep < 0
    assert values[4].item() == pytest.approx(final)
    # for SD final = ᾱ_0, so also check a distinct value (set_alpha_to_one=True gives 1.0) is used, not ᾱ_0
    assert alpha_bar(scheduler.alphas_cumprod, torch.tensor([-19, 1]), 1.0).tolist() == pytest.approx(
        [1.0, scheduler.alphas_cumprod[1].item()]
    )


def test_last_step_matches_diffusers_with_set_alpha_to_one():
    """With set_alpha_to_one=True the last step's ᾱ_prev is 1 ≠ ᾱ_0: σ = 0 and x' = x̂0 (DDIM Eq. 12 at ᾱ_prev = 1)."""
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
        steps_offset=1,
    )  # fmt: skip
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    torch.manual_seed(0)
    x, eps, z = torch.randn(3, 1, *SHAPE).unbind(0)
    timesteps = torch.tensor([1])
    final = float(scheduler.final_alpha_cumprod)
    t_prev = previous_timesteps(timesteps, NUM_TRAIN_TIMESTEPS, NUM_INFERENCE_STEPS)
    abar_t = alpha_bar(scheduler.alphas_cumprod, timesteps, final)
    abar_prev = alpha_bar(scheduler.alphas_cumprod, t_prev, final)
    std = ddim_std(abar_t, abar_prev)
    # σ² = (1 − 1)/(1 − ᾱ_1)·(…) = 0
    assert std.item() == 0.0
    mean = ddim_mean(x, eps, abar_t, abar_prev, std)
    out = scheduler.step(eps, 1, x, eta=1.0, variance_noise=z)
    torch.testing.assert_close(out.prev_sample, mean + per_sample(std, x) * z, atol=1e-5, rtol=1e-5)
    # √1·x̂0 + √(1 − 1 − 0)·ε̂ = x̂0
    torch.testing.assert_close(mean, predicted_x0(x, eps, abar_t))


def test_deterministic_ddim_step_matches_diffusers_at_eta_0(scheduler):
    """--model.sampler.eta 0 on a diffusion model: DDIMODE's step equals DDIMScheduler.step(eta=0)."""
    from gflowdiff.diffusion.kernels import DDIMODE

    torch.manual_seed(0)
    x, eps = torch.randn(2, 1, *SHAPE).unbind(0)
    for t in (981, 401, 1):
        timesteps = torch.tensor([t])
        abar_t, abar_prev = schedule_terms(scheduler, timesteps)
        ours = DDIMODE().mean(x, eps, abar_t, abar_prev)
        torch.testing.assert_close(scheduler.step(eps, t, x, eta=0.0).prev_sample, ours, atol=1e-5, rtol=1e-5)


def test_schedule_matches_method_md_table(scheduler):
    timesteps = torch.tensor([981, 401, 1])
    abar_t, abar_prev = schedule_terms(scheduler, timesteps)
    std = ddim_std(abar_t, abar_prev)
    # values printed in docs/method.md §1 (numpy, 4 decimals): σ_981 = 0.4545, σ_401 = 0.2590, σ_1 = 0.0206
    torch.testing.assert_close(std, torch.tensor([0.4545, 0.2590, 0.0206]), atol=1e-4, rtol=0)
    # ᾱ_{t−20}: 0.0073 (t=981), 0.4552 (t=401), ᾱ_0 = 0.99915 on the terminal step
    torch.testing.assert_close(abar_prev, torch.tensor([0.0073, 0.4552, 0.99915]), atol=1e-4, rtol=0)


def test_per_sample_broadcasts_over_trailing_dims():
    values = torch.tensor([1.0, 2.0])
    like = torch.zeros(2, *SHAPE, dtype=torch.float64)
    out = per_sample(values, like)
    # (B,) → (B, 1, 1, 1), cast to the dtype of ``like``
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float64


# ---- DDIM step against diffusers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_ddim_step_matches_diffusers_on_every_step(scheduler, eta):
    """All 50 steps at once (one batch row per step), including the last one where t − Δ < 0."""
    torch.manual_seed(0)
    timesteps = scheduler.timesteps.clone()  # (50,)
    x = torch.randn(len(timesteps), *SHAPE)
    eps = torch.randn_like(x)
    z = torch.randn_like(x)

    abar_t, abar_prev = schedule_terms(scheduler, timesteps)
    std = ddim_std(abar_t, abar_prev, eta)
    mean = ddim_mean(x, eps, abar_t, abar_prev, std)
    x0 = predicted_x0(x, eps, abar_t)

    for i, t in enumerate(timesteps):
        out = scheduler.step(eps[i : i + 1], int(t), x[i : i + 1], eta=eta, variance_noise=z[i : i + 1])
        # x' = μ + σ·z with the same z (diffusers adds std_dev_t·variance_noise when η > 0)
        torch.testing.assert_close(out.prev_sample[0], mean[i] + std[i] * z[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pred_original_sample[0], x0[i], atol=1e-5, rtol=1e-5)

    # the variance of the last step uses ᾱ_prev = final_alpha_cumprod (diffusers' _get_variance(1, −19))
    expected_last = eta * scheduler._get_variance(1, -19).sqrt()
    assert std[-1].item() == pytest.approx(expected_last.item(), rel=1e-6)


def test_ddim_std_eta_scales_linearly_and_matches_ddpm_posterior(scheduler):
    abar_t, abar_prev = schedule_terms(scheduler, scheduler.timesteps)
    # σ(η) = η·σ(1) (DDIM Eq. 16)
    torch.testing.assert_close(ddim_std(abar_t, abar_prev, 0.5), 0.5 * ddim_std(abar_t, abar_prev, 1.0))
    # η = 1: the DDPM posterior variance β̃ = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    torch.testing.assert_close(ddim_std(abar_t, abar_prev) ** 2, beta_tilde)


def test_predicted_x0_inverts_the_forward_noising():
    torch.manual_seed(0)
    x0 = torch.randn(3, *SHAPE, dtype=torch.float64)
    eps = torch.randn_like(x0)
    abar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    a = per_sample(abar, x0)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps  # q(x_t | x_0) with the true noise
    # x̂0 = (x − √(1−ᾱ)ε)/√ᾱ recovers x_0 exactly when ε̂ is the true noise
    torch.testing.assert_close(predicted_x0(x, eps, abar), x0)


# ---- Gaussian log-density and scores --------------------------------------------------------------------------------
def test_gaussian_log_prob_matches_torch_normal():
    torch.manual_seed(0)
    mean = torch.randn(3, *SHAPE, dtype=torch.float64)
    std = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    x_next = mean + per_sample(std, mean) * torch.randn_like(mean)
    expected = torch.distributions.Normal(mean, per_sample(std, mean)).log_prob(x_next).flatten(1).sum(1)
    # log N(x'; μ, σ²I) summed over the C·H·W dims → (B,)
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), expected)


def test_gaussian_log_prob_at_the_mean_is_the_normaliser():
    mean = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    std = torch.tensor([1.0], dtype=torch.float64)
    # two standard-normal dims at their mean: 2·(−½ log 2π) = −log 2π ≈ −1.837877
    assert gaussian_log_prob(mean, mean, std).item() == pytest.approx(-1.8378770664093453)


def test_forward_score_matches_autograd_of_log_prob():
    torch.manual_seed(0)
    mean = torch.randn(3, *SHAPE, dtype=torch.float64)
    std = torch.tensor([0.05, 0.3, 1.5], dtype=torch.float64)
    x_next = (mean + per_sample(std, mean) * torch.randn_like(mean)).requires_grad_(True)
    (expected,) = torch.autograd.grad(gaussian_log_prob(x_next, mean, std).sum(), x_next)
    # ∇_{x'} log N(x'; μ, σ²) = −(x' − μ)/σ²
    torch.testing.assert_close(forward_score(x_next.detach(), mean, std), expected)


def linear_mean(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """μ(x) = A·x + b per sample, with A acting on the flattened (C·H·W) state."""
    return (x.flatten(1) @ matrix.T + bias).reshape(x.shape)


def test_reverse_score_linear_mean_closed_form_and_autograd():
    torch.manual_seed(0)
    d = 2 * 2 * 2
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    matrix = torch.randn(d, d, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64)
    std = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    mean = linear_mean(x, matrix, bias)
    x_next = mean.detach() + per_sample(std, x) * torch.randn_like(x)

    score = reverse_score(x, x_next, mean, std)
    # closed form: ∇_x [−‖x' − Ax − b‖²/(2σ²)] = Aᵀ(x' − Ax − b)/σ²
    closed = ((x_next - mean.detach()).flatten(1) @ matrix).reshape(x.shape) / per_sample(std, x) ** 2
    torch.testing.assert_close(score, closed)
    # the same as autograd of the full log-density (the normaliser does not depend on x)
    (expected,) = torch.autograd.grad(gaussian_log_prob(x_next, mean, std).sum(), x)
    torch.testing.assert_close(score, expected)


def test_reverse_score_matches_finite_differences_for_a_nonlinear_mean():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    x_next = torch.randn_like(x)
    std = torch.tensor([0.5, 1.1], dtype=torch.float64)

    def mean_of(state: torch.Tensor) -> torch.Tensor:
        return 0.8 * torch.tanh(state) + 0.1 * state**2  # an arbitrary smooth μ(x)

    x_grad = x.clone().requires_grad_(True)
    score = reverse_score(x_grad, x_next, mean_of(x_grad), std)

    h = 1e-6
    numeric = torch.zeros_like(x)
    for index in range(x[0].numel()):
        step = torch.zeros(x[0].numel(), dtype=x.dtype)
        step[index] = h
        step = step.reshape(x.shape[1:])
        # central difference per sample: (log p(x + h e_i) − log p(x − h e_i)) / 2h, error O(h²)
        up = gaussian_log_prob(x_next, mean_of(x + step), std)
        down = gaussian_log_prob(x_next, mean_of(x - step), std)
        numeric.flatten(1)[:, index] = (up - down) / (2 * h)
    torch.testing.assert_close(score, numeric, atol=1e-7, rtol=1e-6)


def test_reverse_score_create_graph_and_retained_graph():
    x = torch.randn(2, *SHAPE, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mean = 0.5 * x**2
    x_next = torch.zeros_like(x)
    first = reverse_score(x, x_next, mean, std)
    # create_graph=False: a constant (the reference's allow_2nd=False); the graph of ``mean`` is retained
    assert not first.requires_grad
    second = reverse_score(x, x_next, mean, std, create_graph=True)
    assert second.requires_grad
    torch.testing.assert_close(first, second.detach())
    # second order works: ∂/∂x Σ[x·(x' − ½x²)/σ²] with x' = 0 → −3x²/(2σ²) = −6x² for σ² = ¼
    (hessian_sum,) = torch.autograd.grad(second.sum(), x)
    torch.testing.assert_close(hessian_sum, -6 * x.detach() ** 2)


def test_backward_kernel_scores_match_autograd_of_the_noising_kernel():
    torch.manual_seed(0)
    abar_t = torch.tensor([0.42, 0.96, 0.9983], dtype=torch.float64)
    abar_prev = torch.tensor([0.455, 0.98, 0.99915], dtype=torch.float64)
    x_next = torch.randn(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    ratio = per_sample(abar_t / abar_prev, x_next)
    # P_B(x|x') = N(√(ᾱ_t/ᾱ_prev)·x', (1 − ᾱ_t/ᾱ_prev)·I): one DDPM noising step from t − Δ to t
    x = (ratio.sqrt() * x_next.detach() + (1 - ratio).sqrt() * torch.randn_like(x_next)).requires_grad_(True)
    log_pb = torch.distributions.Normal(ratio.sqrt() * x_next, (1 - ratio).sqrt()).log_prob(x).sum()
    expected_next, expected_cur = torch.autograd.grad(log_pb, (x_next, x))

    score_next, score_cur = backward_kernel_scores(x.detach(), x_next.detach(), abar_t, abar_prev)
    # (∇_{x'} log P_B, ∇_x log P_B) = (√r·(x − √r x')/(1−r), −(x − √r x')/(1−r)) with r = ᾱ_t/ᾱ_prev
    torch.testing.assert_close(score_next, expected_next)
    torch.testing.assert_close(score_cur, expected_cur)
