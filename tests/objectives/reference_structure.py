"""The reference code's passes (docs/method.md §3.1 steps 6–12), each on its own: the test oracle that the fused and
stacked pass structures are checked against (tests/objectives/test_pass_structure.py, test_gaussian_target.py) and
that scripts/benchmark.py times them against. It ends in the objective's own ``loss_from_residuals``, so the two
paths differ only in how the scores are computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.math import per_sample, reverse_score
from gflowdiff.diffusion.types import ObjectiveOutput, Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.math import nabla_db_residuals
from gflowdiff.objectives.gradient_db.scores import PassOwner, PolicyPass, Scores


def reward_gradient(x: Tensor, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext) -> Tensor:
    """∇_x r(D(x̂0(x))), detached: a target, not a path for gradients. ``x0_hat`` must be a function of ``x``.

    The reward sees the prompts of these transitions' own trajectories. (Fixes the reference, which passes the
    prompts left over from the last sampling batch: docs/method.md §7 item 4.)
    """
    # A NaN reward here makes the loss and gradients NaN; the module then skips the step on every rank.
    rewards = ctx.reward(ctx.policy.decode(x0_hat), prompts)
    (gradient,) = torch.autograd.grad(rewards.sum(), x, retain_graph=True)
    return gradient.detach()


def flow_score_current(
    objective: PassOwner, chunk: Transitions, at_x: PolicyPass, step: TransitionStep, ctx: ObjectiveContext
) -> Tensor:
    """∇_x log F(x) = g_φ(x, t) + β·γ_t·∇_x r(D(x̂0_θ(x, t))), reusing the policy pass ε̂_θ(x, t)."""
    x = at_x.x
    flow = torch.zeros_like(x)
    if objective.guesses_reward_at_x:
        x0_hat = step.x0(x, at_x.eps)
        flow = per_sample(objective.reward_guess_scale(step.signal), x) * reward_gradient(x, x0_hat, chunk.prompts, ctx)
    if objective.use_flow_head:
        flow = flow + ctx.flow_head(chunk.x, chunk.t, chunk.prompt_embeds.embeds)
    return flow


def reference_structure_residuals(
    objective: PassOwner,
    chunk: Transitions,
    ctx: ObjectiveContext,
    at_x: PolicyPass,
    step: TransitionStep,
    prior: Scores,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The reference's passes (docs/method.md §3.1 steps 6–12): the policy's reverse VJP, a reward-gradient pass at
    x' and another at x, each on its own."""
    need_reverse = objective.reverse_loss_scale > 0
    policy_rev = None
    if need_reverse:
        policy_rev = reverse_score(at_x.x, chunk.x_next, at_x.mean, step.std)
    guess_next, _ = objective.guess_next_gradient(chunk, ctx, step)  # while the x graph is alive, as the reference
    flow_next, g_terminal = objective.flow_from_guess_next(chunk, guess_next, ctx, step)
    flow_cur = flow_score_current(objective, chunk, at_x, step, ctx) if need_reverse else None
    forward_residual, reverse_residual = nabla_db_residuals(
        at_x.forward_score, prior.forward, flow_next, policy_rev, prior.reverse, flow_cur
    )
    return forward_residual, reverse_residual, flow_next, g_terminal


def reference_loss(objective, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
    """``objective.loss(chunk, ctx)`` computed with the reference code's passes."""
    step = ctx.policy.transition_step(chunk.t, chunk.t_prev, ctx.sampler.eta)  # DDIM-η, or the flow SDE
    prior = objective.prior_scores(chunk, ctx, step)
    at_x = objective.policy_pass(chunk, ctx, step)
    forward, reverse, flow_next, g_terminal = reference_structure_residuals(objective, chunk, ctx, at_x, step, prior)
    return objective.loss_from_residuals(chunk, step.std, at_x, prior, flow_next, forward, reverse, g_terminal)
