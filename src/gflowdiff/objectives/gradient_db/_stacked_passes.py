"""The ``stacked`` pass structure of the gradient-informed DB objectives: the fused structure's math, with its UNet
passes batched into one forward and one input-gradient backward.

Per transition x → x' the fused structure runs three UNet passes, each a forward and an input vector-Jacobian product
(VJP): the pretrained policy at x (the prior's reverse score, residual ∇-DB only), the policy at x (its reverse score
plus the reward guess at x) and the policy at x' (the forward-looking guess ∇_{x'} r(D(x̂0_θ(x', t−Δ)))). None needs
another's result, so here they are one UNet call on the stacked rows [x (LoRA off); x; x'] (LoRA off on the first
rows: :mod:`gflowdiff.diffusion.adapter_rows`) and one backward that gives all three input gradients. The VAE decoder
+ reward run apart, on detached points, and enter as cotangents ∇_{x̂0} r (the chain rule split in two, as the fused
structure's x' pass does). The parameter backward then runs through the same stacked graph. Same math, same number
of passes over the rows; what changes is that each pass sees up to 3× the batch, which a GPU that is not saturated
(SD-1.5 at B = 4) runs in less time than three passes. The price is memory: the whole stack's graph lives until the
parameter backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gflowdiff.diffusion.conditioning import Conditioning
from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.math import per_sample
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.scores import PassOwner


@dataclass
class StackedPasses:
    """What the stacked passes give the loss. ``policy_eps`` and ``policy_mean`` stay in the graph for the parameter
    backward; every gradient is detached."""

    x: Tensor  # the policy rows' input, a leaf
    policy_eps: Tensor  # ε̂_θ(x, t)
    policy_mean: Tensor  # μ_θ(x)
    pretrained_mean: Tensor | None  # μ_#(x), detached (residual ∇-DB)
    pretrained_reverse: Tensor | None  # ∇_x log P_F^#(x'|x) (residual ∇-DB with w_B > 0)
    reverse_plus_guess: Tensor | None  # ∇_x [log P_F(x'|x) + β·γ_t·r(D(x̂0_θ(x, t)))] (w_B > 0)
    guess_next: Tensor  # ∇_{x'} r at the guess point (x̂0_θ(x', t−Δ); x_T itself on terminal rows)


def _rows(group: Tensor | Conditioning, rows: Tensor | None) -> Tensor | Conditioning:
    return group if rows is None else group[rows]


def stacked_passes(
    objective: PassOwner,
    chunk: Transitions,
    ctx: ObjectiveContext,
    step: TransitionStep,
    source: Tensor | None,
) -> StackedPasses:
    """One UNet forward on the stacked rows and one backward for their input gradients (see the module docstring).

    ``source`` (from :func:`gflowdiff.objectives.gradient_db.math.shared_state_order`): the first ``len(source)`` rows'
    x is the x' of rows ``source``, so their reward cotangent at x is the one already computed at that x'.
    """
    policy = ctx.policy
    need_reverse = objective.reverse_loss_scale > 0
    with_pretrained = objective.stacks_pretrained_pass
    guess_rows = (~chunk.is_terminal).nonzero().squeeze(1)  # (m,) rows whose x' guess needs the policy pass at x'
    if objective.reward_guess_weighting == "off":
        guess_rows = guess_rows[:0]
    with torch.enable_grad():
        x = chunk.x.detach().requires_grad_(True)
        x_next = chunk.x_next.detach().requires_grad_(True)
        x_pretrained = chunk.x.detach().requires_grad_(need_reverse)
        # (input, timestep, rows of the chunk it comes from, LoRA on) per group of the stack
        groups = [(x, chunk.t, None, True), (x_next[guess_rows], chunk.t_prev, guess_rows, True)]
        if with_pretrained:
            groups.insert(0, (x_pretrained, chunk.t, None, False))
        groups = [group for group in groups if len(group[0])]
        sizes = [len(group[0]) for group in groups]
        eps = policy.kernel_output(
            torch.cat([group[0] for group in groups]),
            torch.cat([_rows(group[1], group[2]) for group in groups]),
            Conditioning.cat([_rows(chunk.prompt_embeds, group[2]) for group in groups]),
            Conditioning.cat([_rows(chunk.negative_embeds, group[2]) for group in groups]),
            ctx.sampler.guidance_scale,
            lora_rows=torch.cat([torch.full((size,), group[3]) for size, group in zip(sizes, groups, strict=True)]),
        )  # (Σ sizes, C, H, W)
        parts = list(eps.split(sizes))
        eps_pretrained = parts.pop(0) if with_pretrained else None
        eps_policy = parts.pop(0)
        eps_next = parts.pop(0) if parts else None

        policy_mean = step.mean(x, eps_policy)
        pretrained_mean = None if eps_pretrained is None else step.mean(x_pretrained, eps_pretrained)

        # Σ of every scalar whose input gradient is wanted; rows never mix, so one backward separates them
        total = x.new_zeros(())
        pullback_next = None
        if objective.needs_guess_next(chunk):
            x0_next = x_next
            if eps_next is not None:
                x0_next = x_next.index_put((guess_rows,), step.x0_next(x_next[guess_rows], eps_next, guess_rows))
            pullback_next = objective.reward_pullback(x0_next, chunk.prompts, ctx)  # ∇_{x̂0} r: VAE decoder + reward
            total = total + (x0_next * pullback_next).sum()
        if need_reverse:
            total = total + step.log_prob(chunk.x_next, policy_mean).sum()
            if pretrained_mean is not None:
                total = total + step.log_prob(chunk.x_next, pretrained_mean).sum()
            if objective.guesses_reward_at_x:
                x0 = step.x0(x, eps_policy)
                shared = pullback_next[source] if source is not None and len(source) else None
                cotangent = objective.reward_pullback_at_x(x0, chunk.prompts, ctx, shared)
                total = total + (per_sample(objective.reward_guess_scale(step.signal), x0) * x0 * cotangent).sum()

        wanted = [leaf for leaf in (x, x_next, x_pretrained) if leaf.requires_grad]
        gradients = [None] * len(wanted)
        if total.requires_grad:
            gradients = torch.autograd.grad(total, wanted, retain_graph=True, allow_unused=True)
    found = {id(leaf): gradient for leaf, gradient in zip(wanted, gradients, strict=True)}
    grad_x, grad_next, grad_pretrained = (found.get(id(leaf)) for leaf in (x, x_next, x_pretrained))
    return StackedPasses(
        x=x,
        policy_eps=eps_policy,
        policy_mean=policy_mean,
        pretrained_mean=None if pretrained_mean is None else pretrained_mean.detach(),
        pretrained_reverse=grad_pretrained if need_reverse and with_pretrained else None,
        reverse_plus_guess=grad_x if need_reverse else None,
        guess_next=torch.zeros_like(chunk.x_next) if grad_next is None else grad_next,
    )
