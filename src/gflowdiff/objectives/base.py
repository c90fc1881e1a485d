"""The Objective contract: what a training objective gets from the framework and what it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.diffusion.sampling import SamplerConfig
from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives.flow_head import FlowHead
from gflowdiff.rewards.base import Reward


@dataclass
class ObjectiveContext:
    """What an objective may call during its loss: the policy, the reward, the sampler and the flow head."""

    policy: DiffusionPolicy
    reward: Reward
    sampler: SamplerConfig
    flow_head: FlowHead | None
    generator: torch.Generator


class Objective(nn.Module, ABC):
    """A training objective. The LightningModule samples a rollout, calls :meth:`transitions` once, splits the
    result into chunks of ``--model.optimization.train_batch_size`` and backpropagates :meth:`loss` of each chunk,
    weighted by the chunk's share of the step's transitions. :meth:`loss` must therefore be a mean over the chunk's
    transitions of per-transition terms: then a step's gradient does not depend on the chunk size.

    Objectives keep any state that must survive a resume (e.g. DDPO's per-prompt statistics) as buffers.
    """

    #: The objective differentiates the reward with respect to the image (∇-DB, ReFL, DRaFT).
    requires_reward_gradient: ClassVar[bool] = False
    #: The transition kernels this objective's math is written for (diffusion/kernels.py): "diffusion" (DDIM/DDPM
    #: on ᾱ) and, where it only uses the kernel's mean, std, log-prob and scores, "flow" (the flow SDE).
    kernel_families: ClassVar[tuple[str, ...]] = ("diffusion",)
    #: The objective needs log P_F or its scores (every objective but the reward-backprop ones), so a deterministic
    #: sampler (--model.sampler.eta 0) is refused.
    needs_transition_density: ClassVar[bool] = True

    @property
    def uses_flow_head(self) -> bool:
        return False

    @property
    def target_beta(self) -> float | None:
        """β of the distribution p_pretrained(x)·exp(β·r(x)) this objective targets; None where it targets none
        (reward maximisation: ReFL, DRaFT, DDPO). The evaluation measures target fidelity against it."""
        return None

    def memory_options(self) -> list[str]:
        """This objective's options that lower its peak memory without changing its math, as command-line flags
        with a word on each (listed when a step runs out of memory)."""
        return []

    def check_compatible(self, reward: Reward) -> None:
        """Raise before any heavy work if this objective cannot train on ``reward``."""
        if self.requires_reward_gradient and not reward.differentiable:
            raise ValueError(
                f"--model.objective {type(self).__name__} needs the reward's gradient, but --model.reward "
                f"{type(reward).__name__} is not differentiable; use a policy-gradient objective (e.g. DDPO) "
                f"or a differentiable reward"
            )

    def check_kernel(self, kernel_family: str, model: str) -> None:
        """Raise before any heavy work if this objective's math does not run on the model's transition kernel."""
        if kernel_family not in self.kernel_families:
            raise ValueError(
                f"--model.objective {type(self).__name__} runs on {' and '.join(self.kernel_families)} models; "
                f"--model.pretrained_model {model} is a {kernel_family} model (its sampler is the "
                f"{'flow SDE' if kernel_family == 'flow' else 'DDIM/DDPM kernel'}). On flow models use "
                "ResidualNablaDB, NablaDB, DDPO, ReFL or DRaFT."
            )

    def check_sampler(self, sampler: SamplerConfig) -> None:
        """Raise before any heavy work if this objective needs a transition density the sampler does not have."""
        if self.needs_transition_density and sampler.eta == 0:
            raise ValueError(
                f"--model.sampler.eta 0 is the deterministic sampler (DDIM η = 0, the Euler ODE), which has no "
                f"transition density; --model.objective {type(self).__name__} needs log P_F or its scores: use "
                "eta > 0 (ReFL and DRaFT train with eta 0)"
            )

    def prepare_rollout(self, rollout: Rollout, ctx: ObjectiveContext) -> Rollout:
        """Add what the loss needs beyond the sampled trajectories (e.g. pathwise flow targets); once per rollout."""
        return rollout

    def rollout_loss(self, rollout: Rollout, ctx: ObjectiveContext) -> ObjectiveOutput | None:
        """A loss over the whole rollout, added once to each optimizer step (e.g. fitting a flow head at every
        state); None when the objective has none."""
        return None

    @abstractmethod
    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        """The transitions to train on for this rollout (e.g. a subsample of the steps)."""

    @abstractmethod
    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        """Loss of one chunk of transitions, averaged over it; metrics are detached scalars."""
