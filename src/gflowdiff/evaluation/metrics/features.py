"""Feature spaces for diversity and prior fidelity (Inception/DreamSim weights cannot be downloaded here).

Each extractor maps images in [0, 1] to (B, num_features) and has a ``num_features`` attribute (the interface
torchmetrics' FID expects of a custom feature extractor).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

FeatureSpace = Literal["auto", "classifier", "clip", "pixels"]


class ClassifierFeatures(nn.Module):
    """The embedded digit classifier's penultimate layer (64 features)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.head.in_features)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.embed(images.float())


class ClipImageFeatures(nn.Module):
    """A CLIP image embedding (unit vectors), e.g. ``openai/clip-vit-large-patch14`` or a local folder."""

    def __init__(self, model: str, processor: str | None = None) -> None:
        super().__init__()
        from gflowdiff.rewards.clip_common import ClipEmbedder

        self.embedder = ClipEmbedder(
            model, processor, "--model.evaluation.feature_model", "--model.evaluation.feature_model"
        )
        self.embedder.requires_grad_(False).eval()
        self.num_features = int(self.embedder.clip.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.embedder.image_embeddings(images.float())


class PixelFeatures(nn.Module):
    """Images average-pooled to 8×8 (3 × 64 = 192 features): a model-free fallback, blind to semantics."""

    num_features = 192

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)


def build_feature_extractor(space: FeatureSpace, reward: nn.Module, feature_model: str | None) -> nn.Module:
    """``classifier``: the reward's own digit classifier; ``clip``: CLIP from ``feature_model``; ``pixels``: pooled
    pixels; ``auto``: the classifier when the reward has one, else CLIP when ``feature_model`` is given, else pixels."""
    classifier = getattr(reward, "classifier", None)
    if space == "auto":
        space = "classifier" if hasattr(classifier, "embed") else "clip" if feature_model else "pixels"
    if space == "pixels":
        return PixelFeatures()
    if space == "classifier":
        if classifier is None or not hasattr(classifier, "embed"):
            raise ValueError(
                f"--model.evaluation.feature_space classifier needs a reward with a digit classifier, got "
                f"{type(reward).__name__}; use clip with --model.evaluation.feature_model"
            )
        return ClassifierFeatures(classifier)
    if space == "clip":
        if not feature_model:
            raise ValueError(
                "--model.evaluation.feature_model must name a CLIP model (hub id or local folder) for the clip "
                "feature space"
            )
        return ClipImageFeatures(feature_model)
    raise ValueError(f"--model.evaluation.feature_space must be auto, classifier, clip or pixels, got {space!r}")
