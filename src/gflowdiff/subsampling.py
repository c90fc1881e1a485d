"""Which sampler steps of each trajectory are trained on (method.md §2.10). Pure functions on index tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def num_trained_steps(num_steps: int, fraction: float) -> int:
    """K = int(T·fraction) + 1: the terminal step plus int(T·fraction) others (6 for T = 50, fraction 0.1)."""
    return max(1, int(num_steps * fraction)) + 1


def subsample_steps(
    num_steps: int, batch_size: int, fraction: float, low_variance: bool, generator: torch.Generator
) -> Tensor:
    """(B, K) step indices per trajectory; column 0 is always the terminal step T − 1.

    ``low_variance``: split the T steps into n = int(T·fraction) contiguous, near-equal chunks and draw one step
    uniformly from each, cleanest chunk first (a stratified sample; the reference requires n to divide T, here the
    chunks may differ in length by one). Otherwise: n distinct steps drawn uniformly from 0..T−2. Draws are
    independent per trajectory.
    """
    if not 0 < fraction <= 1:
        raise ValueError("--model.objective.timestep_fraction must be in (0, 1]")
    n = num_trained_steps(num_steps, fraction) - 1
    terminal = torch.full((batch_size, 1), num_steps - 1, dtype=torch.long)
    if low_variance:
        chunks = torch.arange(num_steps).tensor_split(n)
        picks = [chunk[torch.randint(len(chunk), (batch_size,), generator=generator)] for chunk in reversed(chunks)]
        return torch.cat([terminal, torch.stack(picks, dim=1)], dim=1)
    if num_steps == 1:
        return terminal
    others = torch.rand(batch_size, num_steps - 1, generator=generator).argsort(dim=1)[:, :n]  # (B, n) distinct
    return torch.cat([terminal, others], dim=1)


def flatten_steps(steps: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K) step indices → flat (B·K,) trajectory and step indices, trajectory-major."""
    batch_size, k = steps.shape
    trajectory = torch.arange(batch_size).repeat_interleave(k)
    return trajectory, steps.reshape(-1)
