"""∇-DB (docs/method.md §2.2): gradient-informed detailed balance against the fixed backward policy; target R(x)^β.

Paper: arXiv 2412.07775 (Liu et al., ICLR 2025), its Eq. 7 (numbering from a secondary source, docs/method.md §0).
"""

from __future__ import annotations

from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.objective import GradientDBObjective
from gflowdiff.objectives.gradient_db.scores import Scores


class NablaDB(GradientDBObjective):
    """Non-residual ∇-DB: ∇ log P_F(x'|x) = ∇ log P_B(x|x') ± ∇ log F, with P_B the one-step DDPM noising kernel.

    Its target is R^β alone: the flow must also learn the pretrained model's own flow, so it does not preserve the
    prior by construction (the ablation that motivates the residual form).

    Args:
        reward_scale: β, the reward exponent of the target R^β.
        reverse_loss_scale: w_B, weight of the reverse condition; 0 = forward-only.
        trust_region_scale: λ, UNet L2 trust region against the behaviour model's stored outputs.
        use_flow_head: learn g_φ; False trusts the forward-looking reward guess alone.
        reward_guess_weighting: γ_t of the forward-looking reward guess.
        transition_weighting: ``none`` (reference) or ``variance`` (residuals × σ_t², same optimum).
        timestep_fraction: fraction of the T steps trained per trajectory.
        low_variance_subsampling: stratify the trained steps over contiguous chunks.
        pass_structure: ``fused`` (default) or ``stacked`` (one UNet call; faster, more memory); the same loss.
        adjacent_pairs: train steps in adjacent pairs, which the fused structure computes with fewer passes.
        detach_flow_in_forward_target: train g_φ by the reverse and terminal conditions only (same optimum);
            ``None``: whenever w_B > 0 or a flow fit trains it (the analytic Gaussian test's floor).
        reward_chunk_size: VAE decoder + reward passes on at most this many images at a time (less memory).
    """

    def prior_scores(self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep) -> Scores:
        forward, reverse = step.backward_scores(chunk.x, chunk.x_next)  # P_B's scores
        return Scores(forward=forward, reverse=reverse if self.reverse_loss_scale > 0 else None)
