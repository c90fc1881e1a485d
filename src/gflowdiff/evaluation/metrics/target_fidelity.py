"""Target fidelity: does the fine-tuned sampler match p_pretrained(x)·exp(β·r(x)), the distribution residual ∇-DB
targets (arXiv 2412.07775, §3.3; docs/evaluation.md)? Measured on a discrete summary of the samples (the digit
classifier's class), as the total variation (TV) between class histograms.

Two estimates of the target's histogram from pretrained samples x_i:
- **exact** (rejection sampling), for rewards bounded above by a known r_max: accept x_i with probability
  exp(β·(r(x_i) − r_max)) ≤ 1; the accepted samples are exact, independent target samples.
- **importance weighting** (any reward): weights w_i ∝ exp(β·r(x_i)); biased and noisier (its effective sample size
  is reported).
Every TV comes with its **floor**: the TV that a perfect sampler gets when it is evaluated the same way (the same
number of its samples against the same kind of target estimate), from a parametric bootstrap.
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
    return torch.bincount(classes, minlength=num_classes).double() / max(len(classes), 1)


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """½ Σ |p − q|: 0 for equal histograms, 1 for disjoint ones."""
    return 0.5 * (p.double() - q.double()).abs().sum()


def effective_sample_size(rewards: Tensor, beta: float) -> Tensor:
    """(Σw)²/Σw² of the importance weights: how many pretrained samples the target estimate really rests on."""
    weights = importance_weights(rewards, beta)
    return 1.0 / weights.pow(2).sum()


def rejection_accept(rewards: Tensor, beta: float, reward_max: float, generator: torch.Generator) -> Tensor:
    """(N,) bool: which pretrained samples are kept as exact samples of p^#·exp(β·r). Accepting x_i with probability
    exp(β·(r_i − r_max)) draws from p^#(x)·exp(β·r(x)) / Z exactly, provided r ≤ r_max everywhere and β ≥ 0."""
    if beta < 0:
        raise ValueError("rejection sampling of the target needs β >= 0")
    if bool((rewards > reward_max + 1e-6).any()):
        raise ValueError(f"a reward {float(rewards.max()):.4g} exceeds the reward's declared upper bound {reward_max}")
    accept_probability = torch.exp(beta * (rewards.double().cpu() - reward_max)).clamp(max=1.0)
    return (torch.rand(len(rewards), generator=generator, dtype=torch.float64) < accept_probability).to(rewards.device)


def _multinomial_histograms(histogram: Tensor, count: int, draws: int, generator: torch.Generator) -> Tensor:
    """(draws, K) histograms of ``count`` samples each from ``histogram``: multinomial counts drawn as a chain of
    binomials, n_k ~ Bin(count − Σ_{j<k} n_j, p_k / Σ_{j≥k} p_j) (memory independent of ``count``)."""
    probabilities = histogram.double().cpu()
    remaining = torch.full((draws,), float(count), dtype=torch.float64)
    tail = probabilities.flip(0).cumsum(0).flip(0)  # Σ_{j≥k} p_j
    counts = []
    for k in range(len(probabilities)):
        share = (probabilities[k] / tail[k]).clamp(0, 1) if tail[k] > 0 else torch.tensor(0.0, dtype=torch.float64)
        drawn = torch.binomial(remaining, share.expand(draws), generator=generator)
        counts.append(drawn)
        remaining = remaining - drawn
    return torch.stack(counts, dim=1) / count


def exact_tv_floor(
    histogram: Tensor, tuned_count: int, target_count: int, generator: torch.Generator, draws: int = 200
) -> tuple[float, float]:
    """(mean, std) of the TV between ``tuned_count`` and ``target_count`` independent samples of the same histogram:
    what a sampler that matches the target exactly scores against a rejection-sampled target of that size."""
    tuned = _multinomial_histograms(histogram, tuned_count, draws, generator)
    target = _multinomial_histograms(histogram, target_count, draws, generator)
    tvs = 0.5 * (tuned - target).abs().sum(dim=1)
    return float(tvs.mean()), float(tvs.std())


def importance_tv_floor(
    classes: Tensor, rewards: Tensor, beta: float, num_classes: int, tuned_count: int, generator: torch.Generator,
    draws: int = 200,
) -> tuple[float, float]:  # fmt: skip
    """(mean, std) of the TV a perfect sampler scores against the importance-weighted estimate: ``tuned_count``
    samples of the estimated target against the estimate from a bootstrap resample of the pretrained samples."""
    histogram = importance_weighted_histogram(classes, rewards, beta, num_classes).cpu()
    tuned = _multinomial_histograms(histogram, tuned_count, draws, generator)
    tvs = []
    for row in range(draws):
        pick = torch.randint(len(classes), (len(classes),), generator=generator).to(classes.device)
        resampled = importance_weighted_histogram(classes[pick], rewards[pick], beta, num_classes).cpu()
        tvs.append(float(total_variation(tuned[row], resampled)))
    tvs_tensor = torch.tensor(tvs)
    return float(tvs_tensor.mean()), float(tvs_tensor.std())


def target_fidelity(
    tuned_classes: Tensor,
    pretrained_classes: Tensor,
    pretrained_rewards: Tensor,
    beta: float,
    reward_max: float | None,
    num_classes: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """TV between the fine-tuned class histogram and the target's, with its floor (see the module docstring).

    ``pretrained_*`` must come from noise independent of the fine-tuned samples. Exact (rejection) where
    ``reward_max`` is known, else importance-weighted. Keys: ``tv``, ``tv_floor``, ``tv_floor_std``, ``reward``
    (E_target[r]), ``samples`` (accepted target samples, or the effective sample size), ``exact`` (1 or 0), and the
    class histograms ``tuned_histogram``/``target_histogram`` as lists.
    """
    generator = torch.Generator().manual_seed(seed)
    tuned = class_histogram(tuned_classes.long().cpu(), num_classes)
    pretrained_classes, pretrained_rewards = pretrained_classes.long().cpu(), pretrained_rewards.double().cpu()
    if reward_max is not None:
        accepted = rejection_accept(pretrained_rewards, beta, reward_max, generator)
        if not bool(accepted.any()):
            raise ValueError("rejection sampling accepted no pretrained sample: draw more pretrained samples")
        target = class_histogram(pretrained_classes[accepted], num_classes)
        floor, floor_std = exact_tv_floor(target, len(tuned_classes), int(accepted.sum()), generator)
        reward, samples = float(pretrained_rewards[accepted].mean()), float(accepted.sum())
    else:
        target = importance_weighted_histogram(pretrained_classes, pretrained_rewards, beta, num_classes)
        floor, floor_std = importance_tv_floor(
            pretrained_classes, pretrained_rewards, beta, num_classes, len(tuned_classes), generator
        )
        reward = float((importance_weights(pretrained_rewards, beta) * pretrained_rewards).sum())
        samples = float(effective_sample_size(pretrained_rewards, beta))
    return {
        "tv": float(total_variation(tuned, target)),
        "tv_floor": floor,
        "tv_floor_std": floor_std,
        "reward": reward,
        "samples": samples,
        "exact": float(reward_max is not None),
        "tuned_histogram": tuned.tolist(),
        "target_histogram": target.tolist(),
    }


class TargetFidelity(Metric):
    """:func:`target_fidelity` over an evaluation's batches (states gathered across ranks)."""

    full_state_update = False

    def __init__(self, beta: float, reward_max: float | None = None, num_classes: int = 10) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError("target fidelity needs β >= 0")
        self.beta, self.reward_max, self.num_classes = beta, reward_max, num_classes
        self.add_state("pretrained_rewards", default=[], dist_reduce_fx="cat")
        self.add_state("pretrained_classes", default=[], dist_reduce_fx="cat")
        self.add_state("tuned_classes", default=[], dist_reduce_fx="cat")

    def update(self, pretrained_rewards: Tensor, pretrained_classes: Tensor, tuned_classes: Tensor) -> None:
        self.pretrained_rewards.append(pretrained_rewards.detach().double())
        self.pretrained_classes.append(pretrained_classes.detach().long())
        self.tuned_classes.append(tuned_classes.detach().long())

    def target_histogram(self) -> Tensor:
        """The importance-weighted estimate (kept for callers that want it whatever the reward's bound)."""
        rewards, classes = dim_zero_cat(self.pretrained_rewards), dim_zero_cat(self.pretrained_classes)
        return importance_weighted_histogram(classes, rewards, self.beta, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        results = target_fidelity(
            dim_zero_cat(self.tuned_classes),
            dim_zero_cat(self.pretrained_classes),
            dim_zero_cat(self.pretrained_rewards),
            self.beta,
            self.reward_max,
            self.num_classes,
        )
        return {
            key: torch.tensor(value, dtype=torch.float32)
            for key, value in results.items()
            if not isinstance(value, list)
        }
