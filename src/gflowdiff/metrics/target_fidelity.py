"""Target fidelity: does the fine-tuned sampler match p_pretrained(x)·exp(β·r(x)), the distribution residual ∇-DB
targets (method.md §2.3)? Measured on a discrete summary of the samples (the digit classifier's class).

The target's class histogram is estimated by self-normalised importance sampling: pretrained samples x_i, weights
w_i ∝ exp(β·r(x_i)); the target's expected reward is Σ w_i r(x_i).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def importance_weights(rewards: Tensor, beta: float) -> Tensor:
    """w_i = exp(β r_i) / Σ_j exp(β r_j), computed stably."""
    return torch.softmax(beta * rewards.double(), dim=0)


def importance_weighted_histogram(classes: Tensor, rewards: Tensor, beta: float, num_classes: int) -> Tensor:
    """Class histogram of the tilted target estimated from pretrained samples (classes, rewards)."""
    weights = importance_weights(rewards, beta)
    return torch.zeros(num_classes, dtype=torch.float64, device=classes.device).index_add_(0, classes, weights)


def class_histogram(classes: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(classes, minlength=num_classes).double() / len(classes)


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """½ Σ |p − q|: 0 for equal histograms, 1 for disjoint ones."""
    return 0.5 * (p.double() - q.double()).abs().sum()


def effective_sample_size(rewards: Tensor, beta: float) -> Tensor:
    """(Σw)²/Σw² of the importance weights: how many pretrained samples the target estimate really rests on."""
    weights = importance_weights(rewards, beta)
    return 1.0 / weights.pow(2).sum()


class TargetFidelity(Metric):
    """TV distance between the fine-tuned class histogram and the importance-weighted target's, plus the target's
    expected reward and the effective sample size of its estimate."""

    full_state_update = False

    def __init__(self, beta: float, num_classes: int = 10) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError("target fidelity needs β >= 0")
        self.beta, self.num_classes = beta, num_classes
        self.add_state("pretrained_rewards", default=[], dist_reduce_fx="cat")
        self.add_state("pretrained_classes", default=[], dist_reduce_fx="cat")
        self.add_state("tuned_classes", default=[], dist_reduce_fx="cat")

    def update(self, pretrained_rewards: Tensor, pretrained_classes: Tensor, tuned_classes: Tensor) -> None:
        self.pretrained_rewards.append(pretrained_rewards.detach().double())
        self.pretrained_classes.append(pretrained_classes.detach().long())
        self.tuned_classes.append(tuned_classes.detach().long())

    def target_histogram(self) -> Tensor:
        rewards, classes = dim_zero_cat(self.pretrained_rewards), dim_zero_cat(self.pretrained_classes)
        return importance_weighted_histogram(classes, rewards, self.beta, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        rewards = dim_zero_cat(self.pretrained_rewards)
        target = self.target_histogram()
        tuned = class_histogram(dim_zero_cat(self.tuned_classes), self.num_classes)
        return {
            "tv": total_variation(tuned, target).float(),
            "reward": (importance_weights(rewards, self.beta) * rewards).sum().float(),
            "effective_sample_size": effective_sample_size(rewards, self.beta).float(),
        }
