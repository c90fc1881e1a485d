"""Diversity: the mean pairwise distance between samples of the same prompt, in a feature space."""

from __future__ import annotations

import zlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Distance = Literal["cosine", "euclidean"]


def prompt_ids(prompts: list[str], device: torch.device) -> Tensor:
    """A stable integer per prompt string (the same on every rank, unlike ``hash``)."""
    return torch.tensor([zlib.crc32(p.encode()) for p in prompts], dtype=torch.long, device=device)


def mean_pairwise_distance(features: Tensor, distance: Distance) -> Tensor:
    """Mean over the n(n−1) ordered pairs i ≠ j of d(f_i, f_j); ``cosine`` is 1 − cos (DreamSim's form)."""
    n = len(features)
    if distance == "cosine":
        unit = F.normalize(features.double(), dim=-1)
        distances = 1 - unit @ unit.T
    else:
        distances = torch.cdist(features.double(), features.double())
    return (distances.sum() - distances.diagonal().sum()) / (n * (n - 1))


class PerPromptDiversity(Metric):
    """Average over prompts (with ≥ 2 samples) of the mean pairwise feature distance among that prompt's samples.

    Features are given by the caller (``update(features, prompts)``) so the metric works in any feature space: the
    digit classifier's penultimate layer, a CLIP image embedding, or DreamSim.
    """

    full_state_update = False

    def __init__(self, distance: Distance = "cosine") -> None:
        super().__init__()
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"diversity distance must be 'cosine' or 'euclidean', got {distance!r}")
        self.distance = distance
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("prompt_ids", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, prompts: list[str]) -> None:
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} feature rows for {len(prompts)} prompts")
        self.features.append(features.detach().float())
        self.prompt_ids.append(prompt_ids(prompts, features.device))

    def compute(self) -> Tensor:
        features, ids = dim_zero_cat(self.features), dim_zero_cat(self.prompt_ids)
        per_prompt = [
            mean_pairwise_distance(features[ids == prompt], self.distance)
            for prompt in ids.unique()
            if int((ids == prompt).sum()) >= 2
        ]
        if not per_prompt:
            raise ValueError("diversity needs at least two samples of one prompt")
        return torch.stack(per_prompt).mean().float()
