"""A weighted sum of rewards, r(x) = Σ_k w_k r_k(x), e.g. aesthetic + a prompt-alignment term."""

from __future__ import annotations

import math
from collections import Counter

from torch import Tensor, nn

from gflowdiff.rewards.base import Reward


def term_names(rewards: list[Reward]) -> list[str]:
    """Class names, with ``_<index>`` appended where a class appears more than once."""
    names = [type(reward).__name__ for reward in rewards]
    counts = Counter(names)
    return [f"{name}_{index}" if counts[name] > 1 else name for index, name in enumerate(names)]


class WeightedSum(Reward):
    """r(x) = Σ_k w_k · r_k(x). Differentiable iff every term is; prompt-aware iff any term is.

    After each call, ``last_terms`` maps each term's name (its class name, plus ``_<index>`` if repeated) to its
    unweighted (B,) scores, detached, for logging.

    Args:
        rewards: the terms, each a reward config (``class_path`` + ``init_args``).
        weights: one weight per term; default: all 1.
    """

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None):
        super().__init__()
        if not rewards:
            raise ValueError("--model.reward.rewards must list at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(
                f"--model.reward.weights has {len(weights)} values but --model.reward.rewards has {len(rewards)} terms"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("--model.reward.weights must be finite")
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights
        self.names = term_names(rewards)
        # Instance attributes shadow the class-level flags of Reward: they depend on the terms.
        self.differentiable = all(reward.differentiable for reward in rewards)
        self.uses_prompt = any(reward.uses_prompt for reward in rewards)
        bounded = all(
            reward.upper_bound is not None and weight >= 0 for reward, weight in zip(rewards, weights, strict=True)
        )
        self.upper_bound = sum(w * r.upper_bound for r, w in zip(rewards, weights, strict=True)) if bounded else None
        self.last_terms: dict[str, Tensor] = {}
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for name, weight, reward in zip(self.names, self.weights, self.rewards, strict=True):
            value = reward(images, prompts)  # (B,), each term validates its own input
            terms[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        self.last_terms = terms
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {weight:g}" for name, weight in zip(self.names, self.weights, strict=True))
