"""How one rollout becomes optimizer steps: chunking, accumulation, clipping, the learning-rate schedule.

``--model.optimization.*`` (the optimizer itself is ``--model.optimizer``, a class path with its lr and weight decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class OptimizationConfig:
    """How the transitions of a rollout are turned into optimizer steps.

    Args:
        train_batch_size: transitions per backward pass (a memory knob: the step's loss is the mean over all its
            transitions whatever this is).
        optimizer_steps_per_rollout: optimizer steps that share one rollout (its chunks are split among them).
        max_grad_norm: gradient-norm clip, applied to each parameter group separately; 0 disables.
        lr_decay: ``none`` (a constant learning rate, the reference's) or ``cosine``: every group's learning rate
            follows ½(1 + cos(π·s/S)) over the S = max_steps × optimizer_steps_per_rollout optimizer steps of the run
            (needs ``--trainer.max_steps``). Once the flow is fixed (``flow_head_fit: value``) the policy's loss is a
            plain stochastic regression, whose last iterates a decaying step size averages.
        flow_head_lr: learning rate of the flow head's parameter group (default: the optimizer's).
        flow_head_weight_decay: weight decay of the flow head's parameter group (default: the optimizer's).
        off_policy: train on the previous rollout while keeping the fresh one (the reference's one-epoch-stale
            data, docs/method.md §3.4); default: on-policy.
        max_consecutive_bad_steps: stop the run after this many consecutive steps skipped for NaN/inf rewards,
            losses or gradients (each one is skipped, counted and logged as ``train/skipped_steps``).
    """

    train_batch_size: int = 4
    optimizer_steps_per_rollout: int = 1
    max_grad_norm: float = 1.0
    lr_decay: Literal["none", "cosine"] = "none"
    flow_head_lr: float | None = None
    flow_head_weight_decay: float | None = None
    off_policy: bool = False
    max_consecutive_bad_steps: int = 3

    def __post_init__(self) -> None:
        for option, value in [
            ("train_batch_size", self.train_batch_size),
            ("optimizer_steps_per_rollout", self.optimizer_steps_per_rollout),
            ("max_consecutive_bad_steps", self.max_consecutive_bad_steps),
        ]:
            if value < 1:
                raise ValueError(f"--model.optimization.{option} must be >= 1 (got {value})")
        for option, value in [
            ("max_grad_norm", self.max_grad_norm),
            ("flow_head_lr", self.flow_head_lr),
            ("flow_head_weight_decay", self.flow_head_weight_decay),
        ]:
            if value is not None and value < 0:
                raise ValueError(f"--model.optimization.{option} must be >= 0 (got {value})")
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"--model.optimization.lr_decay must be none or cosine, got {self.lr_decay!r}")


def cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's learning rate × ½(1 + cos(π·s/S)) at optimizer step s of S, then 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
