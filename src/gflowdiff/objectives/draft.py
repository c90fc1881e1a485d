"""DRaFT (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv 2309.17400;
docs/method.md §6).

DRaFT-K backpropagates r(D(x_T)) through the last K sampler steps (K = 1 is the paper's usual choice; K = T is full
backpropagation, as in AlignProp). DRaFT-LV (K = 1) re-noises the final sample n times to the noise level of the last
step and denoises each copy with one gradient-enabled step, averaging the rewards: a lower-variance gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives._pathwise import (
    draw_noise,
    policy_step,
    reward_loss,
    sample_between,
    sampler_schedule,
)
from gflowdiff.objectives.base import Objective, ObjectiveContext


def first_gradient_step(num_steps: int, backprop_steps: int) -> int:
    """Index of the first of the last K steps, T − K; K must be in [1, T]."""
    if not 1 <= backprop_steps <= num_steps:
        raise ValueError(
            f"--model.objective.backprop_steps must be in [1, --model.sampler.num_inference_steps = {num_steps}] "
            f"(got {backprop_steps})"
        )
    return num_steps - backprop_steps


class DRaFT(Objective):
    """Reward backpropagation through the last K sampler steps: loss = loss_scale · (−mean r(D(x_T))).

    Args:
        backprop_steps: K, the number of final sampler steps that carry gradients (1 = DRaFT-1; T = full
            backpropagation, AlignProp-style).
        lv_samples: n > 0 selects DRaFT-LV: re-noise the final sample n times to the last step's noise level and
            denoise each with one gradient step, averaging their rewards (the paper uses n = 2; needs K = 1).
            0 is DRaFT-K.
        gradient_checkpointing: recompute the K differentiated UNet calls in the backward pass (torch.utils.checkpoint)
            instead of storing their activations, so a large K fits in memory.
        loss_scale: multiplies the loss.
        reuse_rollout_states: start from the rollout's stored state before the first differentiated step (exact,
            and free, when training on-policy); False re-samples the earlier steps without gradients from the
            trajectory's initial noise with the current policy.
    """

    requires_reward_gradient = True
    kernel_families = ("diffusion", "flow")  # reparameterised steps of the kernel; P_B's noising for DRaFT-LV
    needs_transition_density = False  # it backpropagates through the steps: the deterministic sampler works too

    def __init__(
        self,
        backprop_steps: int = 1,
        lv_samples: int = 0,
        gradient_checkpointing: bool = False,
        loss_scale: float = 1.0,
        reuse_rollout_states: bool = True,
    ):
        super().__init__()
        if backprop_steps < 1:
            raise ValueError("--model.objective.backprop_steps must be >= 1")
        if lv_samples < 0:
            raise ValueError("--model.objective.lv_samples must be >= 0")
        if lv_samples > 0 and backprop_steps != 1:
            raise ValueError("--model.objective.lv_samples > 0 (DRaFT-LV) needs --model.objective.backprop_steps 1")
        if loss_scale <= 0:
            raise ValueError("--model.objective.loss_scale must be > 0")
        self.backprop_steps, self.lv_samples = backprop_steps, lv_samples
        self.gradient_checkpointing, self.loss_scale = gradient_checkpointing, loss_scale
        self.reuse_rollout_states = reuse_rollout_states

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        """One entry per trajectory: before step T − K (reuse; for LV its x_next is the final sample x_T), or at
        step 0, the initial noise (re-sample)."""
        start = first_gradient_step(rollout.num_steps, self.backprop_steps) if self.reuse_rollout_states else 0
        trajectory = torch.arange(rollout.batch_size)
        return rollout.transitions(trajectory, torch.full_like(trajectory, start))

    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        num_steps = ctx.sampler.num_inference_steps
        start = first_gradient_step(num_steps, self.backprop_steps)
        timesteps, prev_timesteps = sampler_schedule(ctx)
        if self.lv_samples > 0:
            x_final, prompts = self.lv_final_states(chunk, ctx, timesteps, prev_timesteps)
        else:
            x = sample_between(
                ctx, chunk.x, chunk.step, torch.full_like(chunk.step, start), timesteps, prev_timesteps,
                chunk.prompt_embeds, chunk.negative_embeds,
            )  # fmt: skip
            for j in range(start, num_steps):  # the K differentiated steps
                t, t_prev = timesteps[j].repeat(len(x)), prev_timesteps[j].repeat(len(x))
                noise = draw_noise(x, ctx.generator)
                x = policy_step(
                    ctx, x, t, t_prev, chunk.prompt_embeds, chunk.negative_embeds, noise, self.gradient_checkpointing
                )
            x_final, prompts = x, chunk.prompts
        rewards = ctx.reward(ctx.policy.decode(x_final), prompts)
        loss = self.loss_scale * reward_loss(rewards)
        metrics = {"objective/loss": loss.detach(), "objective/reward_final": rewards.detach().mean()}
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def lv_final_states(
        self, chunk: Transitions, ctx: ObjectiveContext, timesteps: Tensor, prev_timesteps: Tensor
    ) -> tuple[Tensor, list[str]]:
        """DRaFT-LV: n copies of each final sample, re-noised to the last step's level and denoised with gradients.

        Returns the (n·B, C, H, W) denoised samples, copy-major, and their prompts.
        """
        n, last = self.lv_samples, len(timesteps) - 1
        if self.reuse_rollout_states:
            x_final = chunk.x_next.detach()  # the transition before the last step: x_next is x_T
        else:
            x_final = sample_between(
                ctx, chunk.x, chunk.step, torch.full_like(chunk.step, last + 1), timesteps, prev_timesteps,
                chunk.prompt_embeds, chunk.negative_embeds,
            )  # fmt: skip
        x_final = x_final.repeat(n, 1, 1, 1)  # (n·B, C, H, W)
        t, t_prev = timesteps[last].repeat(len(x_final)), prev_timesteps[last].repeat(len(x_final))
        step = ctx.policy.transition_step(t, t_prev, ctx.sampler.eta)
        x_noisy = step.backward_sample(x_final, draw_noise(x_final, ctx.generator))
        prompt_embeds = chunk.prompt_embeds.repeat(n)  # n·B rows
        negative_embeds = chunk.negative_embeds.repeat(n)
        noise = draw_noise(x_noisy, ctx.generator)
        x_out = policy_step(ctx, x_noisy, t, t_prev, prompt_embeds, negative_embeds, noise, self.gradient_checkpointing)
        return x_out, list(chunk.prompts) * n
