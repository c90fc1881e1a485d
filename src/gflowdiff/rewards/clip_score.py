"""CLIPScore: prompt-image agreement as a scaled CLIP cosine similarity."""

from __future__ import annotations

import math

from torch import Tensor

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.clip_common import ClipEmbedder
from gflowdiff.rewards.preprocessing import check_prompts, check_unit_range


class ClipScoreReward(Reward):
    """r = weight · cos(CLIP image embedding, CLIP prompt embedding).

    With the default ``weight`` 100 this is torchmetrics' ``CLIPScore`` without its clamp at 0 (Hessel et al.
    2021 use w = 2.5 and max(cos, 0)): the clamp would zero the gradient of badly matching images, which are the
    ones a gradient objective must move.

    Args:
        model: hub id or local folder of a transformers ``CLIPModel``.
        processor: hub id or local folder of its tokenizer and ``preprocessor_config.json``; default: ``model``.
        weight: the factor w multiplying the cosine similarity.
    """

    differentiable = True
    uses_prompt = True

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        weight: float = 100.0,
    ):
        super().__init__()
        if not math.isfinite(weight) or weight == 0:
            raise ValueError("--model.reward.weight must be finite and non-zero")
        self.weight = float(weight)
        self.embedder = ClipEmbedder(model, processor, "--model.reward.model", "--model.reward.processor")
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        check_prompts(images, prompts, type(self).__name__)
        return self.weight * self.embedder.cosine(images, prompts)
