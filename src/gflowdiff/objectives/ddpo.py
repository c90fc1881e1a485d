"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301;
docs/method.md §6).

Policy gradient on the denoising MDP: each sampler step is an action with Gaussian log-probability log P_F(x'|x). The
loss is PPO's clipped surrogate on the importance ratio between the current policy and the behaviour policy that
sampled the rollout, with advantages normalised per prompt. The reward is never differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives.base import Objective, ObjectiveContext

LogProbReduction = Literal["mean", "sum"]


# ---- pure math ------------------------------------------------------------------------------------------------------
def ppo_clip_loss(advantages: Tensor, log_prob: Tensor, log_prob_old: Tensor, clip_range: float) -> Tensor:
    """mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) with ρ = exp(log π_θ − log π_old) (PPO, Schulman et al. 2017,
    arXiv 1707.06347, Eq. 7; DDPO Eq. 5 with the clipped surrogate of its §4.3).

    Notation: ``advantages`` → A of each transition's trajectory; ``log_prob`` → log P_F,θ(x'|x) (differentiable);
    ``log_prob_old`` → the behaviour policy's stored log-prob; ``clip_range`` → ε. All (N,).
    The max of two losses is the pessimistic bound: once ρ leaves [1−ε, 1+ε] in the direction the advantage pushes
    it, the clipped branch wins and the gradient is zero.
    """
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def reduce_log_prob(log_prob_sum: Tensor, num_elements: int, reduction: LogProbReduction) -> Tensor:
    """log P_F summed over the state's elements → ``mean`` (÷ C·H·W, as DDPO's released code does, which is why its
    clip range is as small as 1e-4) or ``sum`` (the true log-density).

    Notation: ``log_prob_sum`` → log P_F(x'|x) of :func:`gaussian_log_prob`, (N,); ``num_elements`` → C·H·W.
    """
    return log_prob_sum / num_elements if reduction == "mean" else log_prob_sum


def standardize(values: Tensor, mean: Tensor | float, std: Tensor | float, eps: float = 1e-6) -> Tensor:
    """(values − mean) / (std + eps): an advantage A = (r − mean r)/std r (DDPO §4.3, "normalized per prompt").

    Notation: ``values`` → rewards r; ``std`` is the population std (ddof = 0), as DDPO's stat tracker uses.
    """
    return (values - mean) / (std + eps)


def per_prompt_advantages(
    rewards: Tensor, prompts: Sequence[str], history: dict[str, Tensor], min_count: int
) -> Tensor:
    """A_i = (r_i − mean_p) / std_p with the statistics of prompt p = prompts[i] (DDPO's per-prompt stat tracking).

    Notation: ``history[p]`` → the recent rewards of prompt p, *including* this batch's. A prompt with fewer than
    ``min_count`` of them is normalised with the whole batch's mean and std instead.
    """
    advantages = torch.empty_like(rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=rewards.device)
        seen = history[prompt]
        if len(seen) < min_count:
            advantages[rows] = standardize(rewards[rows], batch_mean, batch_std)
        else:
            advantages[rows] = standardize(rewards[rows], seen.mean(), seen.std(unbiased=False))
    return advantages


class PromptStatTracker:
    """A running buffer of each prompt's last ``buffer_size`` rewards (plain tensors, so it checkpoints)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, Tensor] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Append this batch's rewards to each prompt's buffer, then return the (B,) per-prompt advantages."""
        cpu_rewards = rewards.detach().float().cpu()
        for prompt in dict.fromkeys(prompts):
            new = cpu_rewards[[i for i, p in enumerate(prompts) if p == prompt]]
            old = self.history.get(prompt, new.new_zeros(0))
            self.history[prompt] = torch.cat([old, new])[-self.buffer_size :]
        return per_prompt_advantages(cpu_rewards, prompts, self.history, self.min_count).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": list(self.history), "rewards": [v.clone() for v in self.history.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {p: v.detach().float().cpu() for p, v in zip(state["prompts"], state["rewards"], strict=True)}


# ---- the objective --------------------------------------------------------------------------------------------------
class DDPO(Objective):
    """DDPO with PPO clipping (DDPO_IS): loss = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) over the trained steps.

    Set ``--model.optimization.optimizer_steps_per_rollout`` to a multiple of ``num_inner_epochs`` (each inner epoch is
    one pass over the rollout's trained transitions; the framework splits the passes over that many optimizer steps).

    Args:
        clip_range: ε of the clipped importance ratio (DDPO: 1e-4 with ``log_prob_reduction: mean``).
        adv_clip_max: advantages are clipped to [−adv_clip_max, adv_clip_max].
        num_inner_epochs: passes over each rollout's transitions (each with a fresh shuffle).
        timestep_fraction: fraction of the T steps trained per trajectory (a fresh random subset in each pass).
        per_prompt_stat_tracking: normalise advantages with each prompt's recent rewards; False uses the batch's.
        stat_buffer_size: rewards kept per prompt for the statistics.
        stat_min_count: below this many rewards for a prompt, fall back to the batch's mean and std.
        log_prob_reduction: ``mean`` over the state's elements (DDPO's released code; matches its clip range) or
            ``sum`` (the true Gaussian log-density).
    """

    kernel_families = ("diffusion", "flow")  # on the flow SDE's log-probs: Flow-GRPO's policy gradient

    def __init__(
        self,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        per_prompt_stat_tracking: bool = True,
        stat_buffer_size: int = 32,
        stat_min_count: int = 16,
        log_prob_reduction: LogProbReduction = "mean",
    ):
        super().__init__()
        if clip_range <= 0:
            raise ValueError("--model.objective.clip_range must be > 0")
        if adv_clip_max <= 0:
            raise ValueError("--model.objective.adv_clip_max must be > 0")
        if num_inner_epochs < 1:
            raise ValueError("--model.objective.num_inner_epochs must be >= 1")
        if not 0 < timestep_fraction <= 1:
            raise ValueError("--model.objective.timestep_fraction must be in (0, 1]")
        if stat_buffer_size < 1:
            raise ValueError("--model.objective.stat_buffer_size must be >= 1")
        if not 1 <= stat_min_count <= stat_buffer_size:
            raise ValueError("--model.objective.stat_min_count must be in [1, --model.objective.stat_buffer_size]")
        if log_prob_reduction not in ("mean", "sum"):
            raise ValueError("--model.objective.log_prob_reduction must be 'mean' or 'sum'")
        self.clip_range, self.adv_clip_max = clip_range, adv_clip_max
        self.num_inner_epochs, self.timestep_fraction = num_inner_epochs, timestep_fraction
        self.per_prompt_stat_tracking = per_prompt_stat_tracking
        self.log_prob_reduction: LogProbReduction = log_prob_reduction
        self.stat_tracker = PromptStatTracker(stat_buffer_size, stat_min_count)

    # The per-prompt statistics live in the module's state dict (key "objective._extra_state"), so they are saved
    # with the trainable state and restored on resume.
    def get_extra_state(self) -> dict[str, Any]:
        return self.stat_tracker.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stat_tracker.load_state_dict(state)

    def advantages(self, rollout: Rollout) -> Tensor:
        """(B,) clipped advantages of the rollout's trajectories; updates the per-prompt statistics."""
        if self.per_prompt_stat_tracking:
            advantages = self.stat_tracker.update(rollout.prompts, rollout.rewards)
        else:
            advantages = standardize(rollout.rewards, rollout.rewards.mean(), rollout.rewards.std(unbiased=False))
        return advantages.clamp(-self.adv_clip_max, self.adv_clip_max)

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        """``num_inner_epochs`` shuffled passes over K = max(1, int(T·fraction)) random steps of every trajectory."""
        batch_size, num_steps = rollout.batch_size, rollout.num_steps
        k = max(1, int(num_steps * self.timestep_fraction))
        advantages = self.advantages(rollout)
        trajectories, steps = [], []
        for _ in range(self.num_inner_epochs):
            step = torch.rand(batch_size, num_steps, generator=generator).argsort(dim=1)[:, :k]  # (B, K) distinct
            order = torch.randperm(batch_size * k, generator=generator)  # shuffle the pass's B·K transitions
            trajectories.append(torch.arange(batch_size).repeat_interleave(k)[order])
            steps.append(step.reshape(-1)[order])
        trajectory = torch.cat(trajectories)
        transitions = rollout.transitions(trajectory, torch.cat(steps))
        transitions.advantages = advantages[trajectory.to(advantages.device)]
        return transitions

    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        if chunk.advantages is None:
            raise ValueError("DDPO.loss needs transitions from DDPO.transitions (they carry the advantages)")
        policy, sampler = ctx.policy, ctx.sampler
        step = policy.transition_step(chunk.t, chunk.t_prev, sampler.eta)  # DDIM-η, or the flow SDE (Flow-GRPO's)
        eps = policy.kernel_output(chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, sampler.guidance_scale)
        mean = step.mean(chunk.x, eps)
        num_elements = chunk.x[0].numel()
        log_prob = reduce_log_prob(step.log_prob(chunk.x_next, mean), num_elements, self.log_prob_reduction)
        log_prob_old = reduce_log_prob(chunk.log_prob_old, num_elements, self.log_prob_reduction)
        loss = ppo_clip_loss(chunk.advantages, log_prob, log_prob_old, self.clip_range)
        with torch.no_grad():
            log_ratio = log_prob - log_prob_old
            metrics = {
                "objective/loss": loss.detach(),
                "objective/approx_kl": 0.5 * log_ratio.pow(2).mean(),
                "objective/clip_fraction": (log_ratio.exp().sub(1).abs() > self.clip_range).float().mean(),
                "objective/advantage_abs": chunk.advantages.abs().mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)
