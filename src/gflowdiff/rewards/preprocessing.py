"""Differentiable image preprocessing for reward models: resize, crop, pad and normalise (B, C, H, W) tensors.

Reward models are usually fed through PIL/torchvision pipelines that quantise to uint8 and cut the gradient. These
helpers do the same geometry on float tensors so that ∇_x r(x) exists: bicubic resizing with antialiasing (what PIL
and torchvision do when shrinking), a center crop by slicing, zero padding, and per-channel normalisation. Nothing
here clamps, so gradients are never zeroed by the preprocessing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Normalisation of OpenAI CLIP, also used by LAION's open_clip models, BLIP and ImageReward.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Tolerance of :func:`check_unit_range` (bf16/fp16 decoders and bicubic ringing stay well inside it).
RANGE_TOLERANCE = 1e-3


def check_unit_range(images: Tensor, owner: str, tolerance: float = RANGE_TOLERANCE) -> None:
    """Reject images outside [0, 1] (beyond ``tolerance``) with an error naming the reward.

    Rewards reject rather than clamp: the usual mistake is passing images in [-1, 1], which a clamp would turn into
    a silently wrong reward. ``GFlowDiffModule`` decodes with a clamp to [0, 1], so its images always pass.
    """
    if images.numel() == 0:
        return
    low, high = torch.stack([images.detach().min(), images.detach().max()]).tolist()  # one device sync
    if not (low >= -tolerance and high <= 1 + tolerance):  # also catches NaN
        raise ValueError(
            f"{owner} expects images in [0, 1], got values in [{low:.4g}, {high:.4g}] "
            f"(images in [-1, 1] must be mapped with x / 2 + 0.5 first)"
        )


def check_prompts(images: Tensor, prompts: Sequence[str], owner: str) -> None:
    """A prompt-aware reward scores image i against prompt i: the counts must match."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{owner} got {images.shape[0]} images but {len(prompts)} prompts (one prompt per image)")


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize with antialiasing to ``size`` = (height, width); a no-op when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (torchvision ``Resize(int)``)."""
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)  # torchvision truncates
    new_size = (size, new_long) if height <= width else (new_long, size)
    return resize(images, new_size)


def resize_longest_side(images: Tensor, size: int) -> Tensor:
    """Resize so that the longer side is ``size``, keeping the aspect ratio (open_clip ``ResizeMaxSize``)."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    return resize(images, (round(height * scale), round(width * scale)))


def center_crop(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop the central (height, width) window by slicing (torchvision ``CenterCrop`` offsets)."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(f"cannot center-crop {crop_h}x{crop_w} from a {height}x{width} image")
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return images[..., top : top + crop_h, left : left + crop_w]


def pad_to_square(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Pad to ``size`` x ``size`` around the center with ``fill`` (open_clip ``ResizeMaxSize`` padding)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = size - height, size - width
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad a {height}x{width} image to {size}x{size}")
    if pad_h == 0 and pad_w == 0:
        return images
    # F.pad takes (left, right, top, bottom); torchvision's [left, top, right, bottom] puts the odd pixel last.
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


class ImagePreprocess(nn.Module):
    """Images in [0, 1] → a model's normalised input, differentiably.

    Args:
        size: side of the square model input.
        mean: per-channel mean of the model's normalisation.
        std: per-channel standard deviation of the model's normalisation.
        mode: ``"crop"``: resize the shorter side to ``size`` then center-crop (CLIP, BLIP, ImageReward);
            ``"pad"``: resize the longer side to ``size`` then zero-pad to a square (open_clip ``ResizeMaxSize``,
            HPSv2). Both are a plain resize for square images.
        crop_size: side of the center crop in ``"crop"`` mode when it differs from ``size``.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        mode: Literal["crop", "pad"] = "crop",
        crop_size: int | None = None,
    ):
        super().__init__()
        if mode not in ("crop", "pad"):
            raise ValueError(f"unknown preprocessing mode {mode!r} (use 'crop' or 'pad')")
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.size, self.mode = int(size), mode
        self.crop_size = int(crop_size) if crop_size is not None else self.size
        # (1, C, 1, 1) for broadcasting; not persistent: a reward's state never goes into a checkpoint.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.mode == "crop":
            images = center_crop(resize_shortest_side(images, self.size), self.crop_size)
        else:
            # The pad value 0 is black in [0, 1], before normalisation, as open_clip pads PIL images.
            images = pad_to_square(resize_longest_side(images, self.size), self.size)
        if images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected {self.mean.shape[1]}-channel images, got {images.shape[1]} channels")
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}, crop_size={self.crop_size}, mode={self.mode!r}"
