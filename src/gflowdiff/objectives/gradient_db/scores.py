"""The small types the ∇-DB objective (objective.py) and its pass structures (_stacked_passes.py, and the tests'
reference structure) share: the prior's scores, the policy's pass at x, and what the pass structures call back on the
objective that runs them (a protocol, so that they need not import objective.py, which imports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.types import Transitions
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.math import GuessWeighting


@dataclass
class Scores:
    """The prior's ∇_{x'} and ∇_x log-density of the transition, and (residual ∇-DB) the pretrained mean μ_#(x)."""

    forward: Tensor
    reverse: Tensor | None
    mean: Tensor | None = None


@dataclass
class PolicyPass:
    """ε̂_θ(x, t) with LoRA on, x a leaf requiring grad: μ_θ(x) and the forward score ∇_{x'} log P_F(x'|x)."""

    x: Tensor
    eps: Tensor
    mean: Tensor
    forward_score: Tensor


class PassOwner(Protocol):
    """What the pass structures use of the :class:`~gflowdiff.objectives.gradient_db.objective.GradientDBObjective`
    that runs them (its options and flow-score methods)."""

    reverse_loss_scale: float
    use_flow_head: bool
    reward_guess_weighting: GuessWeighting
    stacks_pretrained_pass: bool

    @property
    def guesses_reward_at_x(self) -> bool: ...

    def reward_guess_scale(self, abar: Tensor) -> Tensor: ...

    def needs_guess_next(self, chunk: Transitions) -> bool: ...

    def guess_next_gradient(
        self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep
    ) -> tuple[Tensor, Tensor]: ...

    def flow_from_guess_next(
        self, chunk: Transitions, guess: Tensor, ctx: ObjectiveContext, step: TransitionStep,
        head_point: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def reward_pullback(self, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext) -> Tensor: ...

    def reward_pullback_at_x(
        self, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext, shared: Tensor | None
    ) -> Tensor: ...
