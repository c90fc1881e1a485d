"""Residual ∇-DB (docs/method.md §2.3): detailed balance relative to the pretrained policy; target p^#(x)·R(x)^β.

Paper: arXiv 2412.07775 (Liu et al., ICLR 2025), the method it proposes; its target is Eq. 10 (numbering from a
secondary source, docs/method.md §0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.objective import GradientDBObjective
from gflowdiff.objectives.gradient_db.scores import Scores


class ResidualNablaDB(GradientDBObjective):
    """Residual ∇-DB: ∇[log P_F − ρ·log P_F^#] of each transition equals ±∇ log F̃ (P_B cancels).

    The pretrained policy P_F^# is the same UNet with its LoRA disabled.

    Args:
        pretrained_strength: ρ, multiplies the pretrained scores; < 1 tempers the prior (reference README).
        **kwargs: the options of :class:`~gflowdiff.objectives.gradient_db.objective.GradientDBObjective` (β, w_B,
            λ, the flow head, the weighting, the pass structure, ...), documented there and listed by
            ``gflowdiff fit --model.objective.help ResidualNablaDB``.
    """

    def __init__(self, pretrained_strength: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if pretrained_strength < 0:
            raise ValueError("--model.objective.pretrained_strength must be >= 0")
        self.pretrained_strength = pretrained_strength

    stacks_pretrained_pass = True

    def prior_scores(self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep) -> Scores:
        """ρ·∇ log P_F^#(x'|x) with respect to x' (closed form) and x (a VJP through the frozen UNet).

        The reverse score is a constant (no second-order graph). The reference also multiplies the *policy's*
        reverse score by ρ (docs/method.md §2.6 item 2); here ρ scales only the prior, as its definition says.
        """
        need_reverse = self.reverse_loss_scale > 0
        x = chunk.x.detach().requires_grad_(need_reverse)
        with torch.set_grad_enabled(need_reverse), ctx.policy.reference():
            eps = ctx.policy.kernel_output(
                x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, ctx.sampler.guidance_scale
            )
            mean = step.mean(x, eps)
            reverse = step.reverse_score(x, chunk.x_next, mean).detach() if need_reverse else None
        return self.prior_from_pretrained_pass(chunk, step, mean.detach(), reverse)

    def prior_from_pretrained_pass(
        self, chunk: Transitions, step: TransitionStep, mean: Tensor, reverse: Tensor | None
    ) -> Scores:
        """ρ·(∇_{x'} log P_F^#(x'|x), ∇_x log P_F^#(x'|x)) from μ_#(x) and the unscaled reverse score."""
        rho = self.pretrained_strength
        forward = step.forward_score(chunk.x_next, mean)
        return Scores(forward=rho * forward, reverse=None if reverse is None else rho * reverse, mean=mean)
