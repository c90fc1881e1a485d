"""Mean and standard deviation of rewards over every sample seen on every rank."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class RewardStatistics(Metric):
    """Sums of r and r² and a count (summed across ranks), so the result is exact under DDP."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_squares", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rewards: Tensor) -> None:
        rewards = rewards.detach().double().reshape(-1)
        if not torch.isfinite(rewards).all():
            raise ValueError("RewardStatistics: the reward returned NaN/inf; check --model.reward")
        self.total += rewards.sum()
        self.total_squares += rewards.pow(2).sum()
        self.count += rewards.numel()

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.count
        variance = (self.total_squares - self.count * mean**2) / (self.count - 1).clamp(min=1)  # unbiased
        return {"mean": mean.float(), "std": variance.clamp(min=0).sqrt().float()}
