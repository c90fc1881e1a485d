"""Shared pieces of the reward-backpropagation baselines ReFL and DRaFT: sampler steps that can carry gradients.

Notation (docs/method.md §1, §6): the sampler goes from x_0 (noise) to x_T (the sample) in T steps; step j maps the
state at DDPM timestep t_j to the state at t_j − Δ with P_F(x'|x) = N(μ_θ(x, t), σ_t² I). Written reparameterised,
x' = μ_θ(x, t) + σ_t·z with z ~ N(0, I) drawn outside the model, a step is differentiable in θ (and in x), which is
what lets these baselines backpropagate r(D(x_T)) into the LoRA. A flow model's steps are those of its SDE kernel
(docs/method.md §10), written the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gflowdiff.objectives.base import ObjectiveContext


# ---- pure math ------------------------------------------------------------------------------------------------------
def reward_loss(rewards: Tensor, margin: float | None = None) -> Tensor:
    """The loss of a pathwise reward-maximisation method.

    Notation: ``rewards`` → r(D(x̂)) of the samples, differentiable in θ. Without a margin this is −mean r (DRaFT,
    Clark et al. 2023, arXiv 2309.17400, Eq. 2; AlignProp). With one it is ReFL's hinge mean ReLU(margin − r) (Xu et
    al. 2023, ImageReward, arXiv 2304.05977, §4; the released code uses margin 2): samples whose reward already
    exceeds the margin give no gradient.
    """
    if margin is None:
        return -rewards.mean()
    return torch.relu(margin - rewards).mean()


def window_bounds(num_steps: int, start_fraction: float, end_fraction: float) -> tuple[int, int]:
    """Step indices [lo, hi) of the window [start_fraction, end_fraction) of the T steps, never empty.

    ReFL (Xu et al. 2023) samples 40 steps and trains at a random step in 30..39: fractions [0.75, 1.0).
    """
    lo = min(int(start_fraction * num_steps), num_steps - 1)
    hi = max(lo + 1, min(num_steps, round(end_fraction * num_steps)))
    return lo, hi


# ---- sampler steps --------------------------------------------------------------------------------------------------
def sampler_schedule(ctx: ObjectiveContext) -> tuple[Tensor, Tensor]:
    """(T,) times of the sampler's steps and (T,) times after them, as the rollout's (``DiffusionPolicy.step_times``:
    t_j and t_j − Δ, or the flow model's σ_j·1000 and σ_{j+1}·1000)."""
    device = ctx.policy.adapter.device
    timesteps, next_timesteps = ctx.policy.step_times(ctx.sampler.num_inference_steps)
    return timesteps.to(device), next_timesteps.to(device)


def policy_step(
    ctx: ObjectiveContext,
    x: Tensor,
    t: Tensor,
    t_prev: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor,
    noise: Tensor,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """One reparameterised P_F step x' = μ_θ(x, t) + σ_t·z of the policy's kernel (differentiable when grad mode is
    on).

    ``gradient_checkpointing`` recomputes the UNet's activations in the backward pass instead of storing them
    (torch.utils.checkpoint), so backpropagating through many steps fits in memory. The noise z is drawn by the
    caller, outside the checkpointed function, so the recomputation sees the same step.
    """
    policy, sampler = ctx.policy, ctx.sampler
    if gradient_checkpointing and torch.is_grad_enabled():
        eps = checkpoint(
            policy.kernel_output, x, t, prompt_embeds, negative_embeds, sampler.guidance_scale, use_reentrant=False
        )
    else:
        eps = policy.kernel_output(x, t, prompt_embeds, negative_embeds, sampler.guidance_scale)
    step = policy.transition_step(t, t_prev, sampler.eta)  # DDIM-η, or the flow SDE
    return step.sample(step.mean(x, eps), noise)


def draw_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """z ~ N(0, I) shaped like ``like``, from the (CPU) generator, as the sampler draws it."""
    return torch.randn(like.shape, generator=generator).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_between(
    ctx: ObjectiveContext,
    x: Tensor,
    start: Tensor,
    stop: Tensor,
    timesteps: Tensor,
    prev_timesteps: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor,
) -> Tensor:
    """Run sampler steps start[i] … stop[i] − 1 on row i without gradients; rows may stop at different steps.

    ``x`` (B, C, H, W) holds each row's state before step start[i]; the result holds its state before step stop[i].
    """
    x = x.detach().clone()
    if len(x) == 0 or bool((stop <= start).all()):
        return x
    start, stop = start.to(x.device), stop.to(x.device)
    for j in range(int(start.min()), int(stop.max())):
        rows = ((start <= j) & (j < stop)).nonzero().squeeze(1)  # (n,) rows that take step j
        if len(rows) == 0:
            continue
        t = timesteps[j].repeat(len(rows))
        t_prev = prev_timesteps[j].repeat(len(rows))
        noise = draw_noise(x[rows], ctx.generator)
        x[rows] = policy_step(ctx, x[rows], t, t_prev, prompt_embeds[rows], negative_embeds[rows], noise)
    return x
