"""Pure functions for the transitions of a rectified-flow (flow-matching) sampler. Tensors in, tensors out; no modules.

Notation (docs/method.md §10): diffusers' rectified-flow convention, as SD3 trains it (Esser et al. 2024,
arXiv 2403.03206): the state at time s is x_s = (1 − s)·x0 + s·ε with ε ~ N(0, I), s runs from 1 (pure noise) to 0
(data), and the model predicts the velocity v(x, s) ≈ E[ε − x0 | x_s = x]. A sampler step goes from the noisier state x
at time s to the cleaner state x' at s_next < s; dt = s_next − s < 0. Per-sample times are (B,) tensors; every
per-sample scalar is broadcast over the state's trailing dims by :func:`per_sample`.

Times are the scheduler's sigmas (``FlowMatchEulerDiscreteScheduler.sigmas``, after any shift): pass them in fp32 or
fp64, since 1 − s near s = 1 loses most of its digits in bf16.

Precision: every function here computes in at least fp32 (bf16/fp16 inputs are upcast first) and returns that dtype,
so a step's mean, its std and the log-prob of a sample agree however the model's output was stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.math import per_sample


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the step math: x's dtype if it is at least fp32 (fp64 stays fp64), else fp32."""
    return torch.promote_types(x.dtype, torch.float32)


def flow_x0(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """x̂0 = x − s·v, the data the velocity points away from (x_s = x0 + s·(ε − x0)). ``s`` is (B,)."""
    dtype = compute_dtype(x)
    return x.to(dtype) - per_sample(s, x.to(dtype)) * v.to(dtype)


def flow_epsilon(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """ε̂ = x + (1 − s)·v, the noise the velocity implies (x_s = ε − (1 − s)·(ε − x0)). ``s`` is (B,)."""
    dtype = compute_dtype(x)
    return x.to(dtype) + per_sample(1 - s.to(dtype), x.to(dtype)) * v.to(dtype)


def flow_score(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """∇_x log p_s(x) = −ε̂/s = −(x + (1 − s)·v)/s, the marginal's score from the velocity (Tweedie: the score of
    x_s = (1 − s)·x0 + s·ε is −E[ε | x_s]/s). Defined for 0 < s ≤ 1; at s = 1 it is −x exactly."""
    return -flow_epsilon(x, v, s) / per_sample(s.to(compute_dtype(x)), x.to(compute_dtype(x)))


def euler_ode_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """x' = x + v·dt with dt = s_next − s < 0: the deterministic probability-flow step (diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``). The reference the SDE's marginals are tested against."""
    dtype = compute_dtype(x)
    dt = per_sample(s_next.to(dtype) - s.to(dtype), x.to(dtype))
    return x.to(dtype) + v.to(dtype) * dt


def noise_rate_time(s: Tensor, s_next: Tensor) -> Tensor:
    """The time at which the SDE's noise rate σ is evaluated on the step s → s_next: s itself (the Euler–Maruyama
    left point), except on a step that starts at s = 1, where σ_s is infinite and s_next is used instead (the
    step's other end). Shape (B,).

    Why this is allowed: the noise rate of the marginal-preserving SDE (:func:`flow_sde_mean`) is a free function of
    time, so a finite value on the first step is another member of the same family, not an approximation of it. With
    σ taken at s_next the first step's variance is σ²·(1 − s_next) = a²·s_next ≤ a² and its mean keeps a positive
    coefficient 1 − a²·s_next/2 on x; and at s = 1 the score is −x exactly, so the drift needs no model guess there.
    (Flow-GRPO's code replaces only the 1 − s of σ's denominator by 1 − s_next, which differs by the factor √s_next.)
    """
    return torch.where(s >= 1, s_next, s)


def flow_sde_sigma(s: Tensor, s_next: Tensor, noise_level: float = 0.7) -> Tensor:
    """σ = a·√(s_σ/(1 − s_σ)) with s_σ from :func:`noise_rate_time` (the noise schedule of Flow-GRPO's ODE-to-SDE
    conversion, arXiv 2505.05470, σ_t = a·√(t/(1 − t)); ``noise_level`` is a). Shape (B,), at least fp32."""
    time = noise_rate_time(s, s_next).to(torch.promote_types(s.dtype, torch.float32))
    return noise_level * (time / (1 - time)).sqrt()


def flow_sde_std(s: Tensor, s_next: Tensor, noise_level: float = 0.7) -> Tensor:
    """The step's standard deviation σ·√(−dt) = σ·√(s − s_next) (Euler–Maruyama). Shape (B,), at least fp32.

    Positive on every step with 0 ≤ s_next < s ≤ 1 and a > 0, the last one (s_next = 0) included:
    σ·√s_last = a·s_last/√(1 − s_last).
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    return flow_sde_sigma(s, s_next, noise_level) * (s.to(dtype) - s_next.to(dtype)).sqrt()


def flow_sde_mean(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, noise_level: float = 0.7) -> Tensor:
    """μ = x + [v + σ²/(2s)·(x + (1 − s)·v)]·dt, the mean of one Euler–Maruyama step of the SDE with the ODE's
    marginals (Flow-GRPO's ODE-to-SDE conversion, arXiv 2505.05470), σ from :func:`flow_sde_sigma`; the step is
    x' = μ + σ·√(−dt)·z with z ~ N(0, I) (:func:`flow_sde_std`). Computed in at least fp32.

    Why the marginals are kept. The marginals p_s of x_s = (1 − s)·x0 + s·ε are transported by the probability-flow
    ODE dx = v(x, s) ds (Song et al. 2021, arXiv 2011.13456, Eq. 13), so they obey ∂_s p = −∇·(v·p). For any noise
    rate σ(s) ≥ 0 this equals −∇·((v + σ²/2·∇log p)·p) + σ²/2·Δp, the Fokker–Planck equation of
    dx = (v + σ²/2·∇log p_s) ds + σ dW run towards noise. Its time reversal (arXiv 2011.13456, Eq. 6), run from
    s = 1 to 0, is dx = (v − σ²/2·∇log p_s(x)) dt + σ dW̄ with dt < 0, and it has the same marginals p_s for every
    choice of σ. For rectified flow the score comes from the velocity: E[x0 | x] = x − s·v and E[ε | x] =
    x + (1 − s)·v (x = x0 + s·(ε − x0), v = E[ε − x0 | x]), and Tweedie's formula gives ∇log p_s(x) = −E[ε | x]/s =
    −(x + (1 − s)·v)/s (:func:`flow_score`). Substituting gives the drift v + σ²/(2s)·(x + (1 − s)·v) of μ.

    Note σ²/(2s) = a²/(2(1 − s)) whenever σ is taken at s, so μ has no 1/s and the last step (s_next = 0) is finite:
    μ = x̂0 − σ²/2·ε̂ there.
    """
    dtype = compute_dtype(x)
    x, v, s, s_next = x.to(dtype), v.to(dtype), s.to(dtype), s_next.to(dtype)
    sigma = flow_sde_sigma(s, s_next, noise_level)
    # σ²/(2s) per sample; at s_σ = s this is a²/(2(1 − s)) (no division by a small s)
    score_weight = per_sample(sigma**2 / (2 * s), x)
    dt = per_sample(s_next - s, x)
    return x + (v + score_weight * flow_epsilon(x, v, s)) * dt


def flow_noising_kernel(s: Tensor, s_prev: Tensor) -> tuple[Tensor, Tensor]:
    """(r, τ²) of the Gaussian Markov noising kernel x_s | x_{s_prev} = N(r·x_{s_prev}, τ²·I), s > s_prev, with
    r = (1 − s)/(1 − s_prev) and τ² = s² − r²·s_prev²: the unique Gaussian Markov chain whose marginals given x0 are
    the rectified-flow ones, N((1 − s)·x0, s²·I) (r·(1 − s_prev) = 1 − s; r²·s_prev² + τ² = s²). Shapes (B,).

    τ² > 0 whenever 0 ≤ s_prev < s ≤ 1 (s/(1 − s) grows with s); at s = 1, r = 0 and τ² = 1; at s_prev = 0,
    r = 1 − s and τ² = s².
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    s, s_prev = s.to(dtype), s_prev.to(dtype)
    ratio = (1 - s) / (1 - s_prev)
    return ratio, s**2 - ratio**2 * s_prev**2


def flow_backward_kernel_scores(x: Tensor, x_next: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
    """Scores of the fixed backward policy P_B(x|x') = N(r·x', τ²·I) of :func:`flow_noising_kernel` (x at s, x' at
    s_next < s): the flow-model counterpart of ``math.backward_kernel_scores``, same arguments, same order.

    Returns (∇_{x'} log P_B(x|x'), ∇_x log P_B(x|x')) = (r·(x − r·x')/τ², −(x − r·x')/τ²), the P_B terms of the ∇-DB
    conditions (arXiv 2412.07775, Eq. 7; docs/method.md §2.2). Computed in at least fp32.
    """
    dtype = compute_dtype(x)
    x, x_next = x.to(dtype), x_next.to(dtype)
    ratio, variance = flow_noising_kernel(s, s_next)
    ratio = per_sample(ratio, x)
    residual = (x - ratio * x_next) / per_sample(variance, x)
    return ratio * residual, -residual


def flow_backward_kernel_sample(x_next: Tensor, s: Tensor, s_next: Tensor, noise: Tensor) -> Tensor:
    """A draw of P_B(x|x') = N(r·x', τ²·I) (:func:`flow_noising_kernel`, x at s, x' at s_next < s): x = r·x' + τ·z,
    the flow-model counterpart of ``math.backward_kernel_sample``. Computed in at least fp32."""
    dtype = compute_dtype(x_next)
    ratio, variance = flow_noising_kernel(s, s_next)
    return per_sample(ratio, x_next) * x_next.to(dtype) + per_sample(variance.sqrt(), x_next) * noise.to(dtype)


def check_flow_step_times(s: Tensor, s_next: Tensor) -> None:
    """Refuse times outside 0 ≤ s_next < s ≤ 1, where the SDE step's std is zero or undefined (a zero-length step,
    or a step that runs towards noise). Any matching shapes (one step's (B,) times or a whole schedule)."""
    valid = (s_next >= 0) & (s_next < s) & (s <= 1)
    if not bool(valid.all()):
        raise ValueError(
            "flow step times must satisfy 0 <= s_next < s <= 1 (s from 1 = noise to 0 = data); "
            f"got s={s.tolist()}, s_next={s_next.tolist()}"
        )
