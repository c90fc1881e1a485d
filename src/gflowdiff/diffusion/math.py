"""Pure functions for the Gaussian transitions of a DDIM/DDPM sampler. Tensors in, tensors out; no modules.

Notation (docs/method.md §1): a sampler step goes from the noisier state x at DDPM timestep t to the cleaner state x' at
t_prev = t − Δ. ᾱ is the cumulative product of (1 − β) of the training schedule ("alphas_cumprod"); ε̂ is the
(CFG-combined) noise prediction. The forward policy is P_F(x'|x) = N(μ(x), σ_t² I) with the DDIM (Song et al. 2021,
arXiv 2010.02502, Eq. 12) mean and, for η = 1, the DDPM posterior variance. Per-sample timesteps are (B,) tensors;
every per-sample scalar is broadcast over (C, H, W) by :func:`per_sample`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, 1, 1) (as many trailing ones as ``like`` has dims beyond the batch)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def alpha_bar(alphas_cumprod: Tensor, timesteps: Tensor, final_alpha_cumprod: float) -> Tensor:
    """ᾱ at each timestep; a negative timestep (the step after the last) gets ``final_alpha_cumprod``.

    This is diffusers' DDIMScheduler convention: ᾱ_prev = final_alpha_cumprod when t − Δ < 0 (equal to ᾱ_0 for SD,
    where ``set_alpha_to_one=False``).
    """
    timesteps = timesteps.to(alphas_cumprod.device)
    values = alphas_cumprod[timesteps.clamp(min=0)]
    return torch.where(timesteps >= 0, values, torch.full_like(values, final_alpha_cumprod))


def predicted_x0(x: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """x̂0 = (x − √(1−ᾱ_t)·ε̂) / √ᾱ_t (DDIM Eq. 12, "predicted x_0"). ``abar_t`` is (B,)."""
    a = per_sample(abar_t, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def epsilon_from_model_output(output: Tensor, x: Tensor, abar_t: Tensor, prediction_type: str) -> Tensor:
    """The model output as ε̂, whatever the UNet was trained to predict (DDIMScheduler.step's conversions):

    - ``epsilon``: the output is ε̂;
    - ``v_prediction`` (v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, SD 2.x): ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t;
    - ``sample`` (the output is x̂0): ε̂ = (x_t − √ᾱ_t·x̂0) / √(1−ᾱ_t).

    Each map is affine in the output with x_t fixed, so it commutes with classifier-free guidance. ``abar_t`` is (B,).
    """
    if prediction_type == "epsilon":
        return output
    a = per_sample(abar_t, x)
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x
    if prediction_type == "sample":
        return (x - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: epsilon, v_prediction, sample")


def ddim_std(abar_t: Tensor, abar_prev: Tensor, eta: float = 1.0) -> Tensor:
    """σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)) (DDIM Eq. 16); η = 1 is the DDPM posterior std. Shape (B,)."""
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_mean(x: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, std: Tensor) -> Tensor:
    """μ = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ (DDIM Eq. 12, without clipping x̂0, as SD's scheduler config says)."""
    x0 = predicted_x0(x, eps, abar_t)
    a_prev = per_sample(abar_prev, x)
    direction = per_sample((1 - abar_prev - std**2).clamp(min=0).sqrt(), x)
    return a_prev.sqrt() * x0 + direction * eps


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x'; μ, σ²I), summed over all non-batch dims → (B,)."""
    s = per_sample(std, x_next)
    log_density = -((x_next - mean) ** 2) / (2 * s**2) - s.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    return log_density.flatten(1).sum(dim=1)


def forward_score(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """∇_{x'} log P_F(x'|x) = −(x' − μ(x))/σ² (closed form; docs/method.md §1 "forward score"): the policy term of
    the forward ∇-DB condition (arXiv 2412.07775, Eq. 7 in the numbering of docs/method.md §0)."""
    return -(x_next - mean) / per_sample(std, x_next) ** 2


def reverse_score(x: Tensor, x_next: Tensor, mean: Tensor, std: Tensor, create_graph: bool = False) -> Tensor:
    """∇_x log P_F(x'|x) = J_μ(x)ᵀ (x' − μ(x))/σ², by autograd through ``mean`` (which must be a function of ``x``):
    the policy term of the reverse ∇-DB condition (arXiv 2412.07775, Eq. 7; docs/method.md §2.2).

    With ``create_graph=False`` the result is a constant for the policy's parameters, as in the reference code
    (docs/method.md §2.6 item 1); ``True`` keeps the graph for a second-order backward into the policy.
    """
    log_prob = -((x_next - mean) ** 2 / (2 * per_sample(std, x_next) ** 2)).sum()
    (score,) = torch.autograd.grad(log_prob, x, create_graph=create_graph, retain_graph=True)
    return score


def backward_kernel_scores(x: Tensor, x_next: Tensor, abar_t: Tensor, abar_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Scores of the fixed backward policy P_B(x|x') = N(√(ᾱ_t/ᾱ_prev)·x', (1 − ᾱ_t/ᾱ_prev)·I) (one DDPM noising step,
    the P_B of DAG, Zhang et al. 2024, arXiv 2406.00633, ``calculate_pb``).

    Returns (∇_{x'} log P_B(x|x'), ∇_x log P_B(x|x')), the P_B terms of the ∇-DB conditions (arXiv 2412.07775,
    Eq. 7; docs/method.md §2.2).
    """
    ratio = per_sample(abar_t / abar_prev, x)
    residual = (x - ratio.sqrt() * x_next) / (1 - ratio)
    return ratio.sqrt() * residual, -residual


def backward_kernel_sample(x_next: Tensor, abar_t: Tensor, abar_prev: Tensor, noise: Tensor) -> Tensor:
    """A draw of P_B(x|x') (:func:`backward_kernel_scores`): x = √(ᾱ_t/ᾱ_prev)·x' + √(1 − ᾱ_t/ᾱ_prev)·z, one DDPM
    noising step from level ᾱ_prev back to ᾱ_t. Given a final sample x_T it is distributed like the state before
    the last sampler step (DRaFT-LV, Clark et al. 2023, arXiv 2309.17400, Alg. 2). ``abar_*`` are (B,)."""
    ratio = per_sample(abar_t / abar_prev, x_next)
    return ratio.sqrt() * x_next + (1 - ratio).sqrt() * noise


def previous_timesteps(timesteps: Tensor, num_train_timesteps: int, num_inference_steps: int) -> Tensor:
    """t − Δ with Δ = num_train_timesteps // num_inference_steps, as DDIMScheduler.step computes ``prev_timestep``."""
    return timesteps - num_train_timesteps // num_inference_steps
