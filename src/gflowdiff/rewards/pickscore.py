"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences."""

from __future__ import annotations

from torch import Tensor

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.clip_common import ClipEmbedder
from gflowdiff.rewards.preprocessing import check_prompts, check_unit_range


class PickScoreReward(Reward):
    """PickScore = exp(logit_scale) · cos(image embedding, prompt embedding), about 18–24 for SD-1.5 samples.

    This is the released scorer's logit (``model.logit_scale.exp() * text_embs @ image_embs.T``, diagonal). Some
    codebases divide it by 26 to land near [0, 1]; here that factor belongs in the objective's reward scale.

    Args:
        model: hub id or local folder of the PickScore ``CLIPModel`` weights.
        processor: hub id or local folder of the tokenizer and ``preprocessor_config.json`` (PickScore reuses the
            LAION CLIP-ViT-H-14 processor).
    """

    differentiable = True
    uses_prompt = True

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ):
        super().__init__()
        self.embedder = ClipEmbedder(model, processor, "--model.reward.model", "--model.reward.processor")
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        check_prompts(images, prompts, type(self).__name__)
        return self.embedder.clip.logit_scale.exp() * self.embedder.cosine(images, prompts)
