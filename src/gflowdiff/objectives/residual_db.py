"""Residual DB (docs/method.md §6, [LLMREV]): scalar detailed balance relative to the pretrained policy; target
p^#(x)·R(x)^β. The DB analogue of residual ∇-DB (docs/method.md §2.3), a baseline of arXiv 2412.07775 (per a
secondary source)."""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.math import ddim_mean
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives._scalar_db import ScalarDBObjective, reduced_gaussian_log_prob
from gflowdiff.objectives.base import ObjectiveContext


class ResidualDB(ScalarDBObjective):
    """Residual DB: (log F̃(x) + log P_F(x'|x) − log P_F^#(x'|x) − log F̃(x'))², with F̃ = F/F^# and F̃(x_T) = R^β.

    The pretrained model satisfies DB with the same P_B and its own flow F^#; subtracting the two conditions cancels
    P_B. P_F^# is the same UNet with its LoRA disabled. F̃'s learned part is a scalar read out of ``--model.flow_head``.

    Args:
        reward_scale: β, the reward exponent of the target p^#·R^β.
        forward_looking: add β·r(D(x̂0_θ(x_t))) to the learned log-flow; False learns F_φ alone.
        trust_region_scale: λ, UNet L2 trust region against the behaviour model's stored outputs (acts only off-policy
            or with several optimizer steps per rollout).
        timestep_fraction: fraction of the T steps trained per trajectory.
        low_variance_subsampling: stratify the trained steps over contiguous chunks.
        log_prob_reduction: ``mean`` over elements (DAG; effective exponent β·C·H·W) or ``sum`` (exact p^#·R^β).
    """

    @torch.no_grad()
    def prior_log_prob(
        self, chunk: Transitions, ctx: ObjectiveContext, std: Tensor, abar_t: Tensor, abar_prev: Tensor
    ) -> Tensor:
        """log P_F^#(x'|x) under the pretrained policy (a constant: no graph through the reference pass)."""
        with ctx.policy.reference():
            eps = ctx.policy.kernel_output(
                chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, ctx.sampler.guidance_scale
            )
        mean = ddim_mean(chunk.x, eps, abar_t, abar_prev, std)
        return reduced_gaussian_log_prob(chunk.x_next, mean, std, self.log_prob_reduction)
