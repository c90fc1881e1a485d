"""Which sampler steps of each trajectory are trained on (docs/method.md §2.10). Pure functions on index tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def num_trained_steps(num_steps: int, fraction: float) -> int:
    """K = int(T·fraction) + 1: the terminal step plus int(T·fraction) others (6 for T = 50, fraction 0.1)."""
    return max(1, int(num_steps * fraction)) + 1


def subsample_steps(
    num_steps: int,
    batch_size: int,
    fraction: float,
    low_variance: bool,
    generator: torch.Generator,
    adjacent_pairs: bool = False,
) -> Tensor:
    """(B, K) step indices per trajectory; column 0 is always the terminal step T − 1.

    ``low_variance``: split the T steps into n = int(T·fraction) contiguous, near-equal chunks and draw one step
    uniformly from each, cleanest chunk first (a stratified sample; the reference requires n to divide T, here the
    chunks may differ in length by one). Otherwise: n distinct steps drawn uniformly from 0..T−2. Draws are
    independent per trajectory. ``adjacent_pairs``: see :func:`subsample_adjacent_pairs`.
    """
    if not 0 < fraction <= 1:
        raise ValueError("--model.objective.timestep_fraction must be in (0, 1]")
    if adjacent_pairs:
        return subsample_adjacent_pairs(num_steps, batch_size, fraction, low_variance, generator)
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


def subsample_adjacent_pairs(
    num_steps: int, batch_size: int, fraction: float, low_variance: bool, generator: torch.Generator
) -> Tensor:
    """(B, 2·P) step indices: P pairs of adjacent steps (j, j + 1), so the state x_{j+1} that ends one trained
    transition starts the other, and the fused pass structure computes the reward guess there once.

    The pairs tile the steps from the end, (T−2, T−1), (T−4, T−3), ...: the terminal pair always comes first
    (columns 0 and 1 are T − 1 and T − 2), every step belongs to one pair (step 0 to none when T is odd), and
    P = ⌈K/2⌉ for the K of :func:`num_trained_steps`. The other P − 1 pairs are drawn from pairs 1 … T//2 − 1 as
    steps are (stratified over contiguous chunks of pairs with ``low_variance``, else distinct and uniform), so all
    of them have the same chance of being trained; step T − 2 is always trained, with the terminal step.
    """
    num_pairs = num_steps // 2
    if num_pairs == 0:  # one sampler step: only the terminal transition exists
        return torch.full((batch_size, 1), num_steps - 1, dtype=torch.long)
    n = min(-(-num_trained_steps(num_steps, fraction) // 2), num_pairs) - 1  # pairs besides the terminal one
    pairs = torch.zeros(batch_size, 1, dtype=torch.long)  # pair p holds steps T−2−2p and T−1−2p; 0 is terminal
    if n and low_variance:
        chunks = torch.arange(1, num_pairs).tensor_split(n)
        picks = [chunk[torch.randint(len(chunk), (batch_size,), generator=generator)] for chunk in chunks]
        pairs = torch.cat([pairs, torch.stack(picks, dim=1)], dim=1)
    elif n:
        others = 1 + torch.rand(batch_size, num_pairs - 1, generator=generator).argsort(dim=1)[:, :n]
        pairs = torch.cat([pairs, others], dim=1)
    later = num_steps - 1 - 2 * pairs  # (B, P): the later step of each pair
    return torch.stack([later, later - 1], dim=2).reshape(batch_size, -1)


def flatten_steps(steps: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K) step indices → flat (B·K,) trajectory and step indices, trajectory-major."""
    batch_size, k = steps.shape
    trajectory = torch.arange(batch_size).repeat_interleave(k)
    return trajectory, steps.reshape(-1)
