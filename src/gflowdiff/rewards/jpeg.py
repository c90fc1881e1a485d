"""JPEG (in)compressibility (DDPO, Black et al. 2023): the file size of the image saved as a JPEG, in kB."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.preprocessing import check_unit_range


def jpeg_kilobytes(images: Tensor, quality: int) -> Tensor:
    """(B, C, H, W) in [0, 1] with C = 1 or 3 → (B,) fp32 JPEG sizes in kB (1 kB = 1000 bytes), via PIL."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"JPEG rewards expect 1 or 3 channels, got {images.shape[1]}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # what saving a PNG would do
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array.squeeze(-1) if array.shape[-1] == 1 else array)).save(
            buffer, format="JPEG", quality=quality
        )
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def _check_quality(quality: int) -> int:
    if not 1 <= quality <= 100:
        raise ValueError("--model.reward.quality must be in 1..100")
    return int(quality)


class JpegCompressibility(Reward):
    """r = −(JPEG size in kB): rewards images that compress well (smooth, flat, few details). Not differentiable:
    use it with policy-gradient objectives (DDPO, DB), not with ∇-DB, ReFL or DRaFT.

    Args:
        quality: JPEG quality (1–100) used to encode; DDPO uses 95.
    """

    differentiable = False
    uses_prompt = False
    sign = -1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = _check_quality(quality)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        return self.sign * jpeg_kilobytes(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """r = +(JPEG size in kB): rewards images that compress badly (texture, noise, detail). Not differentiable.

    Args:
        quality: JPEG quality (1–100) used to encode; DDPO uses 95.
    """

    sign = 1.0
