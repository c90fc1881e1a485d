"""DB (docs/method.md §2.1, §6 "DAG-DB"; Zhang et al. 2024, arXiv 2406.00633): scalar detailed balance against the fixed
backward policy, with a forward-looking learned log-flow. Its target is R(x)^β alone. Detailed balance itself is from
Bengio et al., "GFlowNet Foundations" (arXiv 2111.09266)."""

from __future__ import annotations

from torch import Tensor

from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives._scalar_db import ScalarDBObjective, backward_log_prob
from gflowdiff.objectives.base import ObjectiveContext


class DB(ScalarDBObjective):
    """Scalar DB: (log F(x) + log P_F(x'|x) − log P_B(x|x') − log F(x'))², P_B the one-step DDPM noising kernel.

    The log-flow is F_φ (a scalar read out of ``--model.flow_head``) plus β·r(D(x̂0)) (forward-looking); the reward is
    never differentiated, so any reward works. DAG's settings: β 100 (annealed), λ 1, ``timestep_fraction`` 1.

    Args:
        reward_scale: β, the reward exponent of the target R^β.
        forward_looking: add β·r(D(x̂0_θ(x_t))) to the learned log-flow; False learns F_φ alone.
        trust_region_scale: λ, UNet L2 trust region against the behaviour model's stored outputs (acts only off-policy
            or with several optimizer steps per rollout).
        timestep_fraction: fraction of the T steps trained per trajectory.
        low_variance_subsampling: stratify the trained steps over contiguous chunks.
        log_prob_reduction: ``mean`` over elements (DAG; effective exponent β·C·H·W) or ``sum`` (exact R^β).
    """

    def prior_log_prob(
        self, chunk: Transitions, ctx: ObjectiveContext, std: Tensor, abar_t: Tensor, abar_prev: Tensor
    ) -> Tensor:
        return backward_log_prob(chunk.x, chunk.x_next, abar_t, abar_prev, self.log_prob_reduction)
