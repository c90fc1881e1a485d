"""Residual ∇-DB (docs/method.md §2.3): detailed balance relative to the pretrained policy; target p^#(x)·R(x)^β.

Paper: arXiv 2412.07775 (Liu et al., ICLR 2025), the method it proposes; its target is Eq. 10 (numbering from a
secondary source, docs/method.md §0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gflowdiff.diffusion.math import ddim_mean, forward_score, reverse_score
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.objective import (
    GradientDBObjective,
    GuessWeighting,
    PassStructure,
    TransitionWeighting,
)
from gflowdiff.objectives.gradient_db.scores import Scores


class ResidualNablaDB(GradientDBObjective):
    """Residual ∇-DB: ∇[log P_F − ρ·log P_F^#] of each transition equals ±∇ log F̃ (P_B cancels).

    The pretrained policy P_F^# is the same UNet with its LoRA disabled.

    Args:
        reward_scale: β, the reward exponent of the target p^#·R^β.
        pretrained_strength: ρ, multiplies the pretrained scores; < 1 tempers the prior (reference README).
        reverse_loss_scale: w_B, weight of the reverse condition; 0 = forward-only.
        trust_region_scale: λ, UNet L2 trust region against the behaviour model's stored outputs.
        use_flow_head: learn g_φ; False trusts the forward-looking reward guess alone (reference ``no_flow``).
        reward_guess_weighting: γ_t of the forward-looking reward guess.
        transition_weighting: ``none`` (reference) or ``variance`` (residuals × σ_t², same optimum).
        timestep_fraction: fraction of the T steps trained per trajectory.
        low_variance_subsampling: stratify the trained steps over contiguous chunks.
        pass_structure: ``fused`` (default) or ``stacked`` (one UNet call; faster, more memory); the same loss.
        adjacent_pairs: train steps in adjacent pairs, which the fused structure computes with fewer passes.
        detach_flow_in_forward_target: train g_φ by the reverse and terminal conditions only (same optimum);
            ``None``: whenever w_B > 0 or a flow fit trains it (the analytic Gaussian test's floor).
        reward_chunk_size: VAE decoder + reward passes on at most this many images at a time (less memory).
        pathwise_flow_scale: w_P, regression of the flow score at x' onto its pathwise estimate (trains g_φ).
        forward_flow_target: ``learned`` (g_φ + guess) or ``pathwise`` flow score at x' in the forward condition.
        pathwise_weighting: importance-weight the pathwise forward targets (exact tilted mean shift at every step).
        flow_head_fit: ``detailed_balance`` (the paper's) or ``value`` (F̃_φ fitted to E_#[R^β | x_t]).
        value_warmup_trajectories: pretrained trajectories the value flow head is fitted on before training.
        value_warmup_epochs: passes over them.
    """

    def __init__(
        self,
        reward_scale: float = 1.0,
        pretrained_strength: float = 1.0,
        reverse_loss_scale: float = 1.0,
        trust_region_scale: float = 0.0,
        use_flow_head: bool = True,
        reward_guess_weighting: GuessWeighting = "alpha_bar",
        transition_weighting: TransitionWeighting = "none",
        timestep_fraction: float = 0.1,
        low_variance_subsampling: bool = True,
        pass_structure: PassStructure = "fused",
        adjacent_pairs: bool = False,
        detach_flow_in_forward_target: bool | None = None,
        reward_chunk_size: int | None = None,
        pathwise_flow_scale: float = 0.0,
        forward_flow_target: Literal["learned", "pathwise"] = "learned",
        pathwise_weighting: bool = True,
        flow_head_fit: Literal["detailed_balance", "value"] = "detailed_balance",
        value_warmup_trajectories: int = 4096,
        value_warmup_epochs: int = 6,
    ):
        super().__init__(
            reward_scale=reward_scale,
            reverse_loss_scale=reverse_loss_scale,
            trust_region_scale=trust_region_scale,
            use_flow_head=use_flow_head,
            reward_guess_weighting=reward_guess_weighting,
            transition_weighting=transition_weighting,
            timestep_fraction=timestep_fraction,
            low_variance_subsampling=low_variance_subsampling,
            pass_structure=pass_structure,
            adjacent_pairs=adjacent_pairs,
            detach_flow_in_forward_target=detach_flow_in_forward_target,
            reward_chunk_size=reward_chunk_size,
            pathwise_flow_scale=pathwise_flow_scale,
            forward_flow_target=forward_flow_target,
            pathwise_weighting=pathwise_weighting,
            flow_head_fit=flow_head_fit,
            value_warmup_trajectories=value_warmup_trajectories,
            value_warmup_epochs=value_warmup_epochs,
        )
        if pretrained_strength < 0:
            raise ValueError("--model.objective.pretrained_strength must be >= 0")
        self.pretrained_strength = pretrained_strength

    stacks_pretrained_pass = True

    def prior_scores(
        self, chunk: Transitions, ctx: ObjectiveContext, std: Tensor, abar_t: Tensor, abar_prev: Tensor
    ) -> Scores:
        """ρ·∇ log P_F^#(x'|x) with respect to x' (closed form) and x (a VJP through the frozen UNet).

        The reverse score is a constant (no second-order graph). The reference also multiplies the *policy's*
        reverse score by ρ (docs/method.md §2.6 item 2); here ρ scales only the prior, as its definition says.
        """
        need_reverse = self.reverse_loss_scale > 0
        x = chunk.x.detach().requires_grad_(need_reverse)
        with torch.set_grad_enabled(need_reverse), ctx.policy.reference():
            eps = ctx.policy.predict_noise(
                x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, ctx.sampler.guidance_scale
            )
            mean = ddim_mean(x, eps, abar_t, abar_prev, std)
            reverse = reverse_score(x, chunk.x_next, mean, std).detach() if need_reverse else None
        return self.prior_from_pretrained_pass(chunk, std, mean.detach(), reverse)

    def prior_from_pretrained_pass(
        self, chunk: Transitions, std: Tensor, mean: Tensor, reverse: Tensor | None
    ) -> Scores:
        """ρ·(∇_{x'} log P_F^#(x'|x), ∇_x log P_F^#(x'|x)) from μ_#(x) and the unscaled reverse score."""
        rho = self.pretrained_strength
        forward = forward_score(chunk.x_next, mean, std)
        return Scores(forward=rho * forward, reverse=None if reverse is None else rho * reverse)
