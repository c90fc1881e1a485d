"""diffusion/flow_math.py and diffusion/kernels.py: the rectified-flow SDE and ODE on a Gaussian problem with a known
velocity field, against torch.distributions, autograd, diffusers' flow-matching scheduler and today's DDPM math.

Notation (docs/method.md §10): x_s = (1 − s)·x0 + s·ε, s from 1 (noise) to 0 (data), v ≈ ε − x0; a step goes from x
at s to x' at s_next < s.

The Gaussian problem: x0 ~ N(m, C) in 2-D with a non-diagonal C. Then x0, ε and x_s are jointly Gaussian, with
x_s ~ N((1 − s)·m, Σ_s), Σ_s = (1 − s)²·C + s²·I, and Cov(ε − x0, x_s) = s·I − (1 − s)·C =: K_s, so the exact
velocity is the Gaussian conditional mean v(x, s) = E[ε − x0 | x_s = x] = −m + K_s·Σ_s⁻¹·(x − (1 − s)·m)
(v(x, 1) = x − m, v(x, 0) = −x). It stands in for the model.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from gflowdiff.diffusion import math
from gflowdiff.diffusion.flow_math import (
    euler_ode_step,
    flow_backward_kernel_scores,
    flow_epsilon,
    flow_noising_kernel,
    flow_score,
    flow_sde_mean,
    flow_sde_std,
    flow_x0,
)
from gflowdiff.diffusion.kernels import DDIMODE, DDPMKernel, EulerODE, FlowSDEKernel, NoTransitionDensityError

DATA_MEAN = torch.tensor([1.5, -1.0], dtype=torch.float64)
DATA_COV = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)  # correlation 0.67
NOISE_LEVEL = 0.7


def marginal(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (B, 2), covariance (B, 2, 2)) of x_s for (B,) times s."""
    s = s.reshape(-1, 1, 1)
    return (1 - s[:, 0]) * DATA_MEAN, (1 - s) ** 2 * DATA_COV + s**2 * torch.eye(2, dtype=torch.float64)


def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The exact v(x, s) of the Gaussian problem (module docstring); x (B, 2), s (B,)."""
    mean, cov = marginal(s)
    gain = s.reshape(-1, 1, 1) * torch.eye(2, dtype=torch.float64) - (1 - s.reshape(-1, 1, 1)) * DATA_COV  # K_s
    solved = torch.linalg.solve(cov, (x - mean).unsqueeze(-1))  # (B, 2, 1)
    return -DATA_MEAN + (gain @ solved).squeeze(-1)


def velocity_jacobian(s: float) -> torch.Tensor:
    """∂v/∂x = K_s·Σ_s⁻¹, (2, 2)."""
    _, cov = marginal(torch.tensor([s], dtype=torch.float64))
    gain = s * torch.eye(2, dtype=torch.float64) - (1 - s) * DATA_COV
    return gain @ torch.linalg.inv(cov[0])


def uniform_sigmas(steps: int) -> torch.Tensor:
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64)


def shifted_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's time shift of a uniform grid, s = shift·u/(1 + (shift − 1)·u) (FlowMatchEulerDiscreteScheduler)."""
    u = uniform_sigmas(steps)
    return shift * u / (1 + (shift - 1) * u)


def full(batch: int, value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float64).expand(batch).clone()


def run_sampler(kernel, sigmas: torch.Tensor, samples: int, seed: int, stop_at: int | None = None) -> torch.Tensor:
    """x at s = 1 ~ N(0, I), then the kernel's steps on the exact velocity (stochastic ones draw from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    for s, s_next in list(zip(sigmas[:-1], sigmas[1:], strict=True))[:stop_at]:
        s, s_next = full(samples, s), full(samples, s_next)
        mean = kernel.mean(x, velocity(x, s), s, s_next)
        noise = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
        x = kernel.sample(mean, kernel.std(s, s_next), noise)
    return x


def moment_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Largest absolute errors of the sample mean and sample covariance."""
    return (x.mean(0) - mean).abs().max().item(), (torch.cov(x.T) - cov).abs().max().item()


# ---- the closed forms the kernels rest on ---------------------------------------------------------------------------
def test_x0_and_epsilon_invert_the_interpolation():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    s = torch.tensor([1.0, 0.8, 0.5, 0.1, 0.0], dtype=torch.float64)
    x = math.per_sample(1 - s, x0) * x0 + math.per_sample(s, x0) * eps
    # with the true velocity v = ε − x0: x − s·v = x0 and x + (1 − s)·v = ε, at every s including both ends
    torch.testing.assert_close(flow_x0(x, eps - x0, s), x0)
    torch.testing.assert_close(flow_epsilon(x, eps - x0, s), eps)


def test_score_from_the_velocity_is_the_gaussian_marginal_score():
    """The identity the SDE's drift rests on: ∇log p_s(x) = −(x + (1 − s)·v)/s (Tweedie)."""
    torch.manual_seed(0)
    s = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.03], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64) * 2
    mean, cov = marginal(s)
    exact = -torch.linalg.solve(cov, (x - mean).unsqueeze(-1)).squeeze(-1)  # −Σ_s⁻¹·(x − μ_s)
    torch.testing.assert_close(flow_score(x, velocity(x, s), s), exact)
    # the end points of the velocity: v(x, 1) = x − m, v(x, 0) = −x
    torch.testing.assert_close(velocity(x, full(5, torch.tensor(1.0))), x - DATA_MEAN)
    torch.testing.assert_close(velocity(x, full(5, torch.tensor(0.0))), -x)


def test_euler_ode_step_matches_diffusers_flow_match_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    sigmas = scheduler.sigmas  # 1.0, …, 0.0 (the terminal 0 is appended)
    torch.manual_seed(0)
    x, v = torch.randn(2, 28, 4, 8, 8)
    ours = euler_ode_step(x, v, sigmas[:-1], sigmas[1:])
    for i, t in enumerate(scheduler.timesteps):
        # x' = x + (σ_{i+1} − σ_i)·v
        expected = scheduler.step(v[i : i + 1], t, x[i : i + 1]).prev_sample[0]
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=1e-6)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0


# ---- sampling the Gaussian problem ----------------------------------------------------------------------------------
def test_sde_samples_have_the_data_distribution_and_the_intermediate_marginal():
    """50 uniform steps, 40,000 samples. Tolerance = Monte-Carlo error + discretisation bias:

    - MC: the sample mean's std is √(Σ_ii/N) ≤ √(0.5/40000) = 0.0035; a sample covariance entry's std is
      √((Σ_ii·Σ_jj + Σ_ij²)/N) ≤ √(2·0.5²/40000) = 0.0035 at s = 0 and 0.0027 at s = 0.5. 4 std: 0.014 and 0.011.
    - discretisation: the exact moments of this discrete chain (:func:`chain_moments`) transport the mean exactly on
      this problem, and miss the covariance by 1.4e-3 at s = 0 and by 0.016 at s = 0.5 (the first steps, where the
      noise rate a²·s/(1 − s) is large, carry most of it; test_discretised_moments_converge).
    So 0.015 for the means, 0.02 for the covariance at s = 0 and 0.03 at s = 0.5. Measured: mean 2.2e-3 and
    covariance 7.4e-3 at s = 0; mean 4.7e-3 and covariance 0.021 at s = 0.5.
    """
    sigmas = uniform_sigmas(50)
    kernel = FlowSDEKernel(NOISE_LEVEL)
    x = run_sampler(kernel, sigmas, 40_000, seed=1)
    mean_error, cov_error = moment_errors(x, DATA_MEAN, DATA_COV)
    assert mean_error < 0.015 and cov_error < 0.02, (mean_error, cov_error)

    # after 25 of the 50 steps (s = 0.5): N((1 − s)·m, (1 − s)²·C + s²·I), the ODE's marginal
    x_half = run_sampler(kernel, sigmas, 40_000, seed=2, stop_at=25)
    mean, cov = marginal(torch.tensor([0.5], dtype=torch.float64))
    mean_error, cov_error = moment_errors(x_half, mean[0], cov[0])
    assert mean_error < 0.015 and cov_error < 0.03, (mean_error, cov_error)

    # negative control: the same noise without the score correction σ²/(2s)·ε̂ in the drift inflates the
    # covariance by about ∫σ² ds (infinite at s = 1): far outside the tolerance (measured 1.33)
    class NoScoreCorrection(FlowSDEKernel):
        def mean(self, x, output, time, time_next):
            return euler_ode_step(x, output, time, time_next)

    x_wrong = run_sampler(NoScoreCorrection(NOISE_LEVEL), sigmas, 40_000, seed=1)
    assert moment_errors(x_wrong, DATA_MEAN, DATA_COV)[1] > 0.3


def test_euler_ode_samples_have_the_data_distribution():
    """200 uniform Euler steps, 40,000 samples. MC error as for the SDE (4 std: 0.014); Euler's discretisation
    bias is first order in the step, 6.6e-3 on the covariance at 200 steps (0.026 at 50). Tolerance 0.015 (mean),
    0.025 (covariance). Measured: mean 8.3e-3 (2.4 MC std; the chain's exact mean error is 1e-15), covariance
    0.011."""
    x = run_sampler(EulerODE(), uniform_sigmas(200), 40_000, seed=3)
    mean_error, cov_error = moment_errors(x, DATA_MEAN, DATA_COV)
    assert mean_error < 0.015 and cov_error < 0.025, (mean_error, cov_error)


def chain_moments(kernel, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact terminal mean and covariance of the discrete chain from N(0, I): on this problem every step is
    affine in x, x' = A·x + b + std·z, so mean ← A·mean + b and cov ← A·cov·Aᵀ + std²·I."""
    mean, cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    basis = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)])  # 0, e1, e2
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        s, s_next = full(3, s), full(3, s_next)
        image = kernel.mean(basis, velocity(basis, s), s, s_next)
        offset, matrix = image[0], (image[1:] - image[0]).T
        mean = matrix @ mean + offset
        cov = matrix @ cov @ matrix.T + kernel.std(s, s_next)[0] ** 2 * torch.eye(2, dtype=torch.float64)
    return mean, cov


def test_discretised_moments_converge_with_steps():
    """No Monte-Carlo: the chain's exact moments approach the ODE's marginals as the steps shrink.

    - SD3's shifted grid (shift 3; its first step starts at s = 1 and takes the noise rate at s_next), at s = 0:
      covariance errors 0.112, 0.048, 0.0225, 0.0098 at 10/25/50/100 steps.
    - the uniform grid at s = 0.5: 0.016, 0.0073, 0.0035 at 50/200/800 steps, i.e. only half-order in the step: the
      noise rate a²·s/(1 − s) makes σ²·|dt| ≈ a²/k on the k-th step from s = 1 whatever the step size, and those
      O(1) Euler–Maruyama steps are forgotten only through the SDE's contraction.
    The means are exact (up to 1e-15) on this problem.
    """
    kernel = FlowSDEKernel(NOISE_LEVEL)
    shifted = []
    for steps in (10, 25, 50, 100):
        mean, cov = chain_moments(kernel, shifted_sigmas(steps))
        torch.testing.assert_close(mean, DATA_MEAN, atol=1e-12, rtol=0)
        shifted.append((cov - DATA_COV).abs().max().item())
    assert all(later < 0.6 * earlier for earlier, later in zip(shifted, shifted[1:], strict=False)), shifted
    assert shifted[-1] < 0.012, shifted

    uniform = []
    for steps in (50, 200, 800):
        mean, cov = chain_moments(kernel, uniform_sigmas(steps)[: steps // 2 + 1])  # stop at s = 0.5
        expected_mean, expected_cov = marginal(torch.tensor([0.5], dtype=torch.float64))
        torch.testing.assert_close(mean, expected_mean[0], atol=1e-12, rtol=0)
        uniform.append((cov - expected_cov[0]).abs().max().item())
    # 4× the steps at least roughly halves the error (half order)
    assert all(later < 0.6 * earlier for earlier, later in zip(uniform, uniform[1:], strict=False)), uniform


# ---- densities and scores -------------------------------------------------------------------------------------------
def step_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, v, s, s_next): one 2-D state per row, rows at different times (first step, middle, last step)."""
    s = torch.tensor([1.0, 0.7, 0.31, 0.04], dtype=torch.float64)
    s_next = torch.tensor([0.96, 0.65, 0.2, 0.0], dtype=torch.float64)
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=torch.float64)
    return x, velocity(x, s), s, s_next


def test_sde_log_prob_matches_torch_distributions():
    kernel = FlowSDEKernel(NOISE_LEVEL)
    x, v, s, s_next = step_batch()
    mean, std = kernel.mean(x, v, s, s_next), kernel.std(s, s_next)
    x_next = kernel.sample(mean, std, torch.randn_like(x))
    # log N(x'; μ, σ²I) in 2-D, per row
    expected = torch.stack(
        [
            torch.distributions.MultivariateNormal(mean[i], std[i] ** 2 * torch.eye(2, dtype=torch.float64)).log_prob(
                x_next[i]
            )
            for i in range(4)
        ]
    )
    torch.testing.assert_close(kernel.log_prob(x_next, mean, std), expected)
    # and on image-shaped states (summed over C, H, W) against a product of Normals
    x_img, v_img = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64)
    mean_img = kernel.mean(x_img, v_img, s, s_next)
    x_next_img = mean_img + math.per_sample(std, mean_img) * torch.randn_like(mean_img)
    normal = torch.distributions.Normal(mean_img, math.per_sample(std, mean_img))
    torch.testing.assert_close(kernel.log_prob(x_next_img, mean_img, std), normal.log_prob(x_next_img).sum((1, 2, 3)))


def test_sde_forward_score_matches_autograd_of_log_prob():
    kernel = FlowSDEKernel(NOISE_LEVEL)
    x, v, s, s_next = step_batch()
    mean, std = kernel.mean(x, v, s, s_next), kernel.std(s, s_next)
    x_next = kernel.sample(mean, std, torch.randn_like(x)).requires_grad_(True)
    (expected,) = torch.autograd.grad(kernel.log_prob(x_next, mean, std).sum(), x_next)
    torch.testing.assert_close(kernel.forward_score(x_next.detach(), mean, std), expected)


def test_sde_reverse_score_matches_closed_form_jacobian_and_autograd():
    """On the Gaussian problem μ(x) = A·x + b with A = (1 + c·dt)·I + dt·(1 + c·(1 − s))·∂v/∂x, c = σ²/(2s), so
    ∇_x log P_F(x'|x) = Aᵀ(x' − μ)/σ² (the model's Jacobian enters through v(x))."""
    kernel = FlowSDEKernel(NOISE_LEVEL)
    x, _, s, s_next = step_batch()
    x = x.requires_grad_(True)
    mean, std = kernel.mean(x, velocity(x, s), s, s_next), kernel.std(s, s_next)
    x_next = kernel.sample(mean.detach(), std, torch.randn_like(x))
    score = kernel.reverse_score(x, x_next, mean, std)

    for i in range(4):
        si, dt = s[i].item(), (s_next[i] - s[i]).item()
        s_sigma = s_next[i].item() if si == 1.0 else si  # the first step's noise rate is taken at s_next
        c = NOISE_LEVEL**2 * s_sigma / (1 - s_sigma) / (2 * si)
        matrix = (1 + c * dt) * torch.eye(2, dtype=torch.float64) + dt * (1 + c * (1 - si)) * velocity_jacobian(si)
        closed = matrix.T @ (x_next[i] - mean[i].detach()) / std[i] ** 2
        torch.testing.assert_close(score[i], closed)
    (expected,) = torch.autograd.grad(kernel.log_prob(x_next, mean, std).sum(), x)
    torch.testing.assert_close(score, expected)


def test_flow_backward_scores_match_autograd_of_the_noising_kernel():
    torch.manual_seed(0)
    s = torch.tensor([1.0, 0.7, 0.31, 0.04], dtype=torch.float64)
    s_next = torch.tensor([0.96, 0.65, 0.2, 0.0], dtype=torch.float64)
    x_next = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    # P_B(x|x') = N(r·x', (s² − r²·s_next²)·I), r = (1 − s)/(1 − s_next), written out here independently
    r = math.per_sample((1 - s) / (1 - s_next), x_next)
    scale = math.per_sample((s**2 - ((1 - s) / (1 - s_next)) ** 2 * s_next**2).sqrt(), x_next)
    x = (r * x_next.detach() + scale * torch.randn_like(x_next)).requires_grad_(True)
    log_pb = torch.distributions.Normal(r * x_next, scale).log_prob(x).sum()
    expected_next, expected_cur = torch.autograd.grad(log_pb, (x_next, x))

    score_next, score_cur = FlowSDEKernel().backward_scores(x.detach(), x_next.detach(), s, s_next)
    torch.testing.assert_close(score_next, expected_next)
    torch.testing.assert_close(score_cur, expected_cur)
    # the pure function is the kernel's
    assert torch.equal(flow_backward_kernel_scores(x.detach(), x_next.detach(), s, s_next)[0], score_next)


def test_noising_kernel_composes_to_the_rectified_flow_marginals():
    s_low = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.5], dtype=torch.float64)
    s_mid = torch.tensor([0.2, 0.6, 0.35, 0.55, 0.9], dtype=torch.float64)
    s_high = torch.tensor([0.5, 1.0, 0.8, 0.56, 1.0], dtype=torch.float64)
    # two steps low → mid → high equal one step low → high: r'' = r·r', τ''² = r²·τ'² + τ²
    r1, var1 = flow_noising_kernel(s_mid, s_low)
    r2, var2 = flow_noising_kernel(s_high, s_mid)
    r, var = flow_noising_kernel(s_high, s_low)
    torch.testing.assert_close(r2 * r1, r)
    torch.testing.assert_close(r2**2 * var1 + var2, var)
    # from the data (s_prev = 0): x_s | x0 = N((1 − s)·x0, s²·I), the rectified-flow interpolation
    r0, var0 = flow_noising_kernel(s_high, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(r0, 1 - s_high)
    torch.testing.assert_close(var0, s_high**2)
    assert (var > 0).all() and (var1 > 0).all() and (var2 > 0).all()
    # so from x0 ~ N(m, C) the kernel's marginal at s is N((1 − s)·m, (1 − s)²·C + s²·I), the same as the ODE's


def test_backward_sample_noises_data_to_the_marginal_at_s():
    """x ~ P_B(x | x0) from x0 ~ N(m, C) has the rectified-flow marginal at s (the ODE's and the SDE's); both flow
    kernels draw P_B the same way (it is a property of the marginals, not of the sampler)."""
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = DATA_MEAN + torch.randn(n, 2, dtype=torch.float64, generator=generator) @ torch.linalg.cholesky(DATA_COV).T
    s, zero = torch.full((n,), 0.6, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    x = FlowSDEKernel().backward_sample(x0, noise, s, zero)
    assert torch.equal(EulerODE().backward_sample(x0, noise, s, zero), x)
    mean, cov = marginal(s[:1])
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov[0], atol=0.01, rtol=0)


# ---- the DDPM kernel is today's math --------------------------------------------------------------------------------
def test_ddpm_kernel_is_bit_equal_to_the_math_functions():
    """Every step of SD-1.5's 50-step DDIM schedule at once; η = 1 and 0.5. Plugging the kernel in changes no
    number, so every comparison is ``torch.equal``."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    timesteps = torch.arange(981, 0, -20)  # leading spacing, steps_offset 1
    t_prev = math.previous_timesteps(timesteps, 1000, 50)
    abar_t = math.alpha_bar(alphas_cumprod, timesteps, float(alphas_cumprod[0]))
    abar_prev = math.alpha_bar(alphas_cumprod, t_prev, float(alphas_cumprod[0]))
    torch.manual_seed(0)
    x, eps, z = torch.randn(3, 50, 4, 8, 8)
    for eta in (1.0, 0.5):
        kernel = DDPMKernel(eta)
        std = math.ddim_std(abar_t, abar_prev, eta)
        mean = math.ddim_mean(x, eps, abar_t, abar_prev, std)
        x_next = mean + math.per_sample(std, x) * z
        assert torch.equal(kernel.std(abar_t, abar_prev), std)
        assert torch.equal(kernel.mean(x, eps, abar_t, abar_prev), mean)
        assert torch.equal(kernel.sample(mean, std, z), x_next)
        assert torch.equal(kernel.x0(x, eps, abar_t), math.predicted_x0(x, eps, abar_t))
        assert torch.equal(kernel.backward_sample(x_next, z, abar_t, abar_prev),
                           math.backward_kernel_sample(x_next, abar_t, abar_prev, z))  # fmt: skip
        assert torch.equal(kernel.log_prob(x_next, mean, std), math.gaussian_log_prob(x_next, mean, std))
        assert torch.equal(kernel.forward_score(x_next, mean, std), math.forward_score(x_next, mean, std))
        for ours, theirs in zip(
            kernel.backward_scores(x, x_next, abar_t, abar_prev),
            math.backward_kernel_scores(x, x_next, abar_t, abar_prev),
            strict=True,
        ):
            assert torch.equal(ours, theirs)
        x_grad = x.clone().requires_grad_(True)
        mean_grad = kernel.mean(x_grad, eps * x_grad, abar_t, abar_prev)  # an ε̂ that depends on x
        expected = math.reverse_score(x_grad, x_next, mean_grad, std)
        assert torch.equal(kernel.reverse_score(x_grad, x_next, mean_grad, std), expected)


# ---- edge cases -----------------------------------------------------------------------------------------------------
def test_first_step_from_s_equal_one_is_finite_with_the_noise_rate_of_s_next():
    """At s = 1, σ_s = a·√(s/(1 − s)) is infinite; the step uses σ at s_next (the step's other end). Then
    std = σ·√(1 − s_next) = a·√s_next, and with ε̂ = x at s = 1 the mean is x − (1 − s_next)·v − a²·s_next/2·x."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    s, s_next = scheduler.sigmas[:1].double(), scheduler.sigmas[1:2].double()  # 1.0 → 0.9882
    assert s.item() == 1.0
    torch.manual_seed(0)
    x, v = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64)
    kernel = FlowSDEKernel(NOISE_LEVEL)
    std, mean = kernel.std(s, s_next), kernel.mean(x, v, s, s_next)
    torch.testing.assert_close(std, NOISE_LEVEL * s_next.sqrt())
    torch.testing.assert_close(mean, x - (1 - s_next) * v - NOISE_LEVEL**2 * s_next / 2 * x)
    x_next = kernel.sample(mean, std, torch.randn_like(x))
    assert torch.isfinite(kernel.log_prob(x_next, mean, std)).all()
    assert all(torch.isfinite(score).all() for score in kernel.backward_scores(x, x_next, s, s_next))
    # the same in bf16 inputs with fp32 times: finite
    mean_bf16 = kernel.mean(x.bfloat16(), v.bfloat16(), s.float(), s_next.float())
    assert torch.isfinite(mean_bf16).all() and torch.isfinite(kernel.std(s.float(), s_next.float())).all()


def test_last_step_to_zero_is_stochastic_with_a_finite_density():
    """s_next = 0 is an ordinary SDE step: std = σ_s·√s = a·s/√(1 − s) > 0 and μ = x̂0 − σ_s²/2·ε̂, so the terminal
    transition has a density like every other (the DDPM kernel's last step is stochastic too)."""
    s, s_next = torch.tensor([0.04], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    torch.manual_seed(0)
    x, v = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64)
    kernel = FlowSDEKernel(NOISE_LEVEL)
    std, mean = kernel.std(s, s_next), kernel.mean(x, v, s, s_next)
    torch.testing.assert_close(std, NOISE_LEVEL * s / (1 - s).sqrt())  # 0.7·0.04/√0.96 = 0.02858
    sigma_sq = NOISE_LEVEL**2 * s / (1 - s)
    torch.testing.assert_close(mean, flow_x0(x, v, s) - sigma_sq / 2 * flow_epsilon(x, v, s))
    x_next = kernel.sample(mean, std, torch.randn_like(x))
    assert torch.isfinite(kernel.log_prob(x_next, mean, std)).all()
    assert torch.isfinite(kernel.forward_score(x_next, mean, std)).all()
    # P_B of the terminal transition: x_s | x0 = N((1 − s)·x0, s²·I), finite
    assert all(torch.isfinite(score).all() for score in kernel.backward_scores(x, x_next, s, s_next))


@pytest.mark.parametrize(
    ("s", "s_next"),
    [(0.5, 0.5), (0.4, 0.5), (0.3, -0.1), (1.2, 0.9)],
    ids=["zero-length", "towards-noise", "below-zero", "above-one"],
)
def test_flow_sde_kernel_refuses_step_times_without_a_density(s, s_next):
    kernel = FlowSDEKernel()
    s, s_next = torch.tensor([0.9, s]), torch.tensor([0.8, s_next])  # one valid row, one invalid
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="0 <= s_next < s <= 1"):
        kernel.std(s, s_next)
    with pytest.raises(ValueError, match="0 <= s_next < s <= 1"):
        kernel.mean(x, x, s, s_next)


def test_euler_ode_kernel_has_no_density_and_says_so():
    kernel = EulerODE()
    x, v, s, s_next = step_batch()
    assert not kernel.stochastic and FlowSDEKernel().stochastic and DDPMKernel().stochastic
    torch.testing.assert_close(kernel.mean(x, v, s, s_next), x + v * (s_next - s)[:, None])
    assert torch.equal(kernel.mean(x, v, s, s_next), FlowSDEKernel().ode_step(x, v, s, s_next))
    assert torch.equal(kernel.std(s, s_next), torch.zeros(4, dtype=torch.float64))
    calls = {
        "log_prob": lambda: kernel.log_prob(x, x, s),
        "forward_score": lambda: kernel.forward_score(x, x, s),
        "reverse_score": lambda: kernel.reverse_score(x, x, x, s),
        "backward_scores": lambda: kernel.backward_scores(x, x, s, s_next),
    }
    for name, call in calls.items():
        with pytest.raises(NoTransitionDensityError, match=f"EulerODE.{name}.*eta 0.*need a stochastic kernel"):
            call()


def test_deterministic_ddim_kernel_is_the_ddpm_mean_with_no_noise_and_no_density():
    """DDIMODE (--model.sampler.eta 0 on a diffusion model): DDPMKernel(η)'s mean formula at σ = 0, no density."""
    torch.manual_seed(0)
    x, eps = torch.randn(2, 3, 1, 4, 4).unbind(0)
    abar, abar_next = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.7, 0.99])
    kernel = DDIMODE()
    assert not kernel.stochastic
    assert torch.equal(kernel.std(abar, abar_next), torch.zeros(3))
    mean = kernel.mean(x, eps, abar, abar_next)
    x0 = (x - (1 - abar).sqrt()[:, None, None, None] * eps) / abar.sqrt()[:, None, None, None]  # DDIM Eq. 12, σ = 0
    expected = abar_next.sqrt()[:, None, None, None] * x0 + (1 - abar_next).sqrt()[:, None, None, None] * eps
    torch.testing.assert_close(mean, expected)
    assert torch.equal(kernel.sample(mean, kernel.std(abar, abar_next), torch.randn_like(x)), mean)
    for call in (lambda: kernel.log_prob(x, x, abar), lambda: kernel.forward_score(x, x, abar),
                 lambda: kernel.backward_scores(x, x, abar, abar_next)):  # fmt: skip
        with pytest.raises(NoTransitionDensityError, match="DDIMODE.*eta 0"):
            call()


def test_deterministic_settings_of_the_stochastic_kernels_are_refused():
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        FlowSDEKernel(noise_level=0.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDPMKernel(eta=0.0)


def test_bf16_inputs_step_in_fp32():
    """A bf16 state and velocity are upcast before any arithmetic: the results are fp32 and bit-equal to the same
    call on the upcast inputs; a bf16 x' is upcast before its log-prob."""
    torch.manual_seed(0)
    x, v = torch.randn(2, 4, 4, 8, 8).bfloat16()
    s = torch.tensor([1.0, 0.7, 0.31, 0.04])
    s_next = torch.tensor([0.96, 0.65, 0.2, 0.0])
    kernel = FlowSDEKernel(NOISE_LEVEL)
    mean, std = kernel.mean(x, v, s, s_next), kernel.std(s, s_next)
    assert mean.dtype == std.dtype == torch.float32
    assert torch.equal(mean, flow_sde_mean(x.float(), v.float(), s, s_next, NOISE_LEVEL))
    assert torch.equal(std, flow_sde_std(s, s_next, NOISE_LEVEL))
    for function in (flow_x0, flow_epsilon):
        out = function(x, v, s)
        assert out.dtype == torch.float32 and torch.equal(out, function(x.float(), v.float(), s))
    ode = euler_ode_step(x, v, s, s_next)
    assert ode.dtype == torch.float32 and torch.equal(ode, euler_ode_step(x.float(), v.float(), s, s_next))

    x_next = kernel.sample(mean, std, torch.randn_like(mean)).bfloat16()
    assert torch.equal(kernel.log_prob(x_next, mean, std), math.gaussian_log_prob(x_next.float(), mean, std))
    assert kernel.forward_score(x_next, mean, std).dtype == torch.float32
    scores = kernel.backward_scores(x, x_next, s, s_next)
    assert all(score.dtype == torch.float32 and torch.isfinite(score).all() for score in scores)
    # for contrast: the log-prob with σ rounded to bf16 (what math.gaussian_log_prob does to a bf16 x') differs
    assert not torch.equal(math.gaussian_log_prob(x_next, mean, std), kernel.log_prob(x_next, mean, std))
