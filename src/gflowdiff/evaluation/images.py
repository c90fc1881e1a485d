"""Image grids for TensorBoard (no torchvision: it would pull a CUDA build of torch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def image_grid(images: Tensor, columns: int | None = None, min_size: int = 64, padding: int = 1) -> Tensor:
    """(B, C, H, W) in [0, 1] → (3, rows·H', cols·W') with nearest upscaling so small images stay visible."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    scale = max(1, math.ceil(min_size / images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    batch, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for i in range(batch):
        r, c = divmod(i, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = images[i]
    return grid
