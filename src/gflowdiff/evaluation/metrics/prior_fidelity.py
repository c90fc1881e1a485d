"""Prior preservation: how far the fine-tuned samples of each prompt moved from the pretrained samples of that prompt.

FID (torchmetrics' Fréchet distance between Gaussians fitted to the two feature sets) is the paper's per-prompt
measure; KID (torchmetrics' polynomial-kernel MMD², on features scaled to unit RMS) is unbiased, so usable with few
samples per prompt.
The feature space is the caller's (Inception weights cannot be downloaded here): classifier, CLIP, DreamSim, ...
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from gflowdiff.evaluation.metrics.diversity import prompt_ids


def frechet_distance(a: Tensor, b: Tensor) -> Tensor:
    """FID between two feature sets (rows are samples), in float64."""
    a, b = a.double(), b.double()
    return _compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)).float()


def kernel_distance(a: Tensor, b: Tensor) -> Tensor:
    """KID: unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³, in float64."""
    return poly_mmd(a.double(), b.double()).float()


class PriorFidelity(Metric):
    """Per-prompt FID and KID between fine-tuned and pretrained samples, averaged over prompts.

    ``update(features, prompts, pretrained=...)`` collects either side; ``compute()`` → {"fid", "kid"}.
    """

    full_state_update = False

    def __init__(self, min_samples_per_prompt: int = 2) -> None:
        super().__init__()
        self.min_samples_per_prompt = max(2, min_samples_per_prompt)
        for side in ("tuned", "pretrained"):
            self.add_state(f"{side}_features", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, prompts: list[str], pretrained: bool) -> None:
        side = "pretrained" if pretrained else "tuned"
        getattr(self, f"{side}_features").append(features.detach().float())
        getattr(self, f"{side}_ids").append(prompt_ids(prompts, features.device))

    def compute(self) -> dict[str, Tensor]:
        tuned, tuned_ids = dim_zero_cat(self.tuned_features), dim_zero_cat(self.tuned_ids)
        pretrained, pretrained_ids = dim_zero_cat(self.pretrained_features), dim_zero_cat(self.pretrained_ids)
        # KID's kernel (xᵀy/d + 1)³ depends on the feature scale: features are divided by the pretrained features'
        # root-mean-square value, so the KID of a feature space does not depend on its units. FID stays in raw units.
        scale = pretrained.double().pow(2).mean().sqrt().clamp(min=1e-12).float()
        fids, kids = [], []
        for prompt in tuned_ids.unique():
            a, b = tuned[tuned_ids == prompt], pretrained[pretrained_ids == prompt]
            if min(len(a), len(b)) < self.min_samples_per_prompt:
                continue
            fids.append(frechet_distance(a, b))
            kids.append(kernel_distance(a / scale, b / scale))
        if not fids:
            raise ValueError(
                f"prior fidelity needs >= {self.min_samples_per_prompt} fine-tuned and pretrained samples of a prompt"
            )
        return {"fid": torch.stack(fids).mean(), "kid": torch.stack(kids).mean()}
