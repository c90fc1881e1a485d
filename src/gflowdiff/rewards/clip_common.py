"""What the CLIP-based rewards share: a frozen transformers ``CLIPModel`` with its tokenizer and preprocessing, giving
L2-normalised image and text embeddings whose dot product is the cosine similarity.

Embeddings are computed as ``visual_projection(vision_model(x).pooler_output)`` (and the text analogue) rather than
through ``get_image_features``, whose return type changed in transformers 5.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gflowdiff.rewards.loading import from_pretrained, load_clip_preprocess, load_tokenizer


class ClipEmbedder(nn.Module):
    """A frozen CLIP: ``image_embeddings`` and ``text_embeddings`` are unit vectors in the shared space.

    Args:
        model: hub id or local folder of a transformers ``CLIPModel``.
        processor: hub id or local folder holding the tokenizer and ``preprocessor_config.json``; default ``model``.
        option: the config option naming ``model`` (for errors), e.g. ``--model.reward.model``.
        processor_option: the config option naming ``processor``.
    """

    def __init__(self, model: str, processor: str | None, option: str, processor_option: str):
        super().__init__()
        from transformers import CLIPModel

        processor_source, processor_option = (processor, processor_option) if processor else (model, option)
        # The small files first: a wrong processor fails before gigabytes of weights are read.
        self.tokenizer = load_tokenizer(processor_source, processor_option)
        self.preprocess = load_clip_preprocess(processor_source, processor_option)
        self.clip = from_pretrained(CLIPModel, model, option)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, D) unit vectors."""
        pixels = self.preprocess(images)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output  # (B, vision width)
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """B prompts → (B, D) unit vectors (truncated to the tokenizer's maximum length, 77 for CLIP)."""
        device = self.clip.logit_scale.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        pooled = self.clip.text_model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        ).pooler_output  # (B, text width), the hidden state at the end-of-text token
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B,) cosine similarity of each image with its own prompt (the diagonal of the similarity matrix)."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
