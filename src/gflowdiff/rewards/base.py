"""The Reward contract: images in [0, 1] and prompts in, a (B,) tensor of log-rewards r(x) out, always in fp32."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn


class Reward(nn.Module, ABC):
    """A frozen reward model. Subclasses implement :meth:`score`; callers use ``reward(images, prompts)``.

    Class attributes declare what objectives may rely on: ``differentiable`` (the gradient with respect to the image
    is meaningful, required by gradient objectives such as ∇-DB), ``uses_prompt`` and ``upper_bound`` (a known r_max
    with r(x) ≤ r_max for every image, or None; with it the evaluation samples the target exactly by rejection,
    metrics/target_fidelity.py). A reward is never trained and
    never saved in a checkpoint (the LightningModule keeps only trainable state).
    """

    differentiable: ClassVar[bool] = True
    uses_prompt: ClassVar[bool] = False
    upper_bound: ClassVar[float | None] = None

    def __init__(self) -> None:
        super().__init__()

    def freeze(self) -> Reward:
        """Eval mode and no parameter gradients; call at the end of a subclass's ``__init__``."""
        return self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Reward:  # a reward model stays in eval mode (dropout off, BN frozen)
        return super().train(False)

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, C, H, W) fp32 images in [0, 1] → (B,) log-rewards."""

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (B, C, H, W), got shape {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):  # rewards always run in fp32
            rewards = self.score(images.float(), list(prompts))
        if rewards.shape != (images.shape[0],):
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(rewards.shape)}, expected (B,)")
        return rewards
