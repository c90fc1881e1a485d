"""ReFL (Xu et al. 2023, "ImageReward", arXiv 2304.05977, §4 "Reward Feedback Learning"; docs/method.md §6): one-step
reward backprop.

Sample without gradients down to a random late step k, take one gradient-enabled UNet pass there, predict x̂0 in one
shot, decode it and ascend the reward. Only that single UNet call is differentiated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives._pathwise import reward_loss, sample_between, sampler_schedule, window_bounds
from gflowdiff.objectives.base import Objective, ObjectiveContext


def draw_window_steps(
    batch_size: int, num_steps: int, start_fraction: float, end_fraction: float, generator: torch.Generator
) -> Tensor:
    """(B,) steps drawn uniformly, per trajectory, from the window [start_fraction, end_fraction) of the T steps."""
    lo, hi = window_bounds(num_steps, start_fraction, end_fraction)
    return torch.randint(lo, hi, (batch_size,), generator=generator)


class ReFL(Objective):
    """Reward feedback learning: loss = loss_scale · (−mean r(D(x̂0_θ(x_k, t_k)))) at a random late step k.

    Args:
        window_start: start of the window of trained steps, as a fraction of the T sampler steps (ReFL: step 30 of 40
            → 0.75).
        window_end: end (exclusive) of that window, as a fraction of T.
        margin: if set, use ReFL's hinge mean ReLU(margin − r) instead of −mean r (the released code uses 2).
        loss_scale: multiplies the loss (ReFL's ``grad_scale``, 1e-3 for ImageReward).
        reuse_rollout_states: start from the rollout's stored state at step k (exact, and free, when training
            on-policy); False re-samples steps 0..k−1 from the trajectory's initial noise with the current policy
            (on-policy even with several optimizer steps per rollout or ``--model.optimization.off_policy``).
    """

    requires_reward_gradient = True
    kernel_families = ("diffusion", "flow")  # x̂0 and the steps come from the kernel (x − s·v on a flow model)
    needs_transition_density = False  # it backpropagates through the steps: the deterministic sampler works too

    def __init__(
        self,
        window_start: float = 0.75,
        window_end: float = 1.0,
        margin: float | None = None,
        loss_scale: float = 1.0,
        reuse_rollout_states: bool = True,
    ):
        super().__init__()
        if not 0 <= window_start < window_end <= 1:
            raise ValueError(
                "--model.objective.window_start and --model.objective.window_end must satisfy "
                f"0 <= window_start < window_end <= 1 (got {window_start}, {window_end})"
            )
        if loss_scale <= 0:
            raise ValueError("--model.objective.loss_scale must be > 0")
        self.window_start, self.window_end = window_start, window_end
        self.margin, self.loss_scale = margin, loss_scale
        self.reuse_rollout_states = reuse_rollout_states

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        """One entry per trajectory: at its drawn step k (reuse), or at step 0, the initial noise (re-sample)."""
        trajectory = torch.arange(rollout.batch_size)
        if self.reuse_rollout_states:
            step = draw_window_steps(
                rollout.batch_size, rollout.num_steps, self.window_start, self.window_end, generator
            )
        else:
            step = torch.zeros(rollout.batch_size, dtype=torch.long)
        return rollout.transitions(trajectory, step)

    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        policy, sampler = ctx.policy, ctx.sampler
        timesteps, prev_timesteps = sampler_schedule(ctx)
        if self.reuse_rollout_states:
            target = chunk.step
        else:
            target = draw_window_steps(
                len(chunk), sampler.num_inference_steps, self.window_start, self.window_end, ctx.generator
            ).to(chunk.step.device)
        x = sample_between(
            ctx, chunk.x, chunk.step, target, timesteps, prev_timesteps, chunk.prompt_embeds, chunk.negative_embeds
        )
        index = target.to(timesteps.device)
        t, t_prev = timesteps[index], prev_timesteps[index]
        output = policy.kernel_output(x, t, chunk.prompt_embeds, chunk.negative_embeds, sampler.guidance_scale)
        x0_hat = policy.transition_step(t, t_prev, sampler.eta).x0(x, output)
        rewards = ctx.reward(policy.decode(x0_hat), chunk.prompts)
        loss = self.loss_scale * reward_loss(rewards, self.margin)
        metrics = {
            "objective/loss": loss.detach(),
            "objective/reward_x0_hat": rewards.detach().mean(),
            "objective/trained_step": target.float().mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)
