"""The residual log-flow-score network g_φ(x, t, c) (docs/method.md §2.5).

A small conditional UNet whose output is used directly as a vector field (the learned part of ∇_x log F̃(x)); it is
not the gradient of a scalar network. Its output layer is zero-initialised, weight *and* bias: the reference code
zeroes only the bias, so its g_φ is not zero at step 0 (docs/method.md §2.5, §7 item 7); here it is, so that training
starts exactly at the pretrained sampler with a zero flow correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class FlowHeadConfig:
    """Size of the flow head g_φ. The reference uses (64, 128, 256, 256) for SD-1.5 latents.

    Args:
        block_out_channels: channels per UNet level.
        layers_per_block: ResNet layers per level.
        cross_attention_levels: how many of the first levels use cross-attention to the prompt (0 = none).
        attention_head_dim: attention head size.
        norm_num_groups: GroupNorm groups (must divide every entry of block_out_channels).
    """

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    cross_attention_levels: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8


class FlowHead(nn.Module):
    """g_φ: (state, DDPM timestep, prompt embedding) → a vector field shaped like the state, in fp32."""

    def __init__(self, config: FlowHeadConfig, channels: int, sample_size: int, cross_attention_dim: int):
        super().__init__()
        from diffusers import UNet2DConditionModel

        levels = len(config.block_out_channels)
        if not 0 <= config.cross_attention_levels <= levels:
            raise ValueError(f"--model.flow_head.cross_attention_levels must be in [0, {levels}]")
        down = ["CrossAttnDownBlock2D" if i < config.cross_attention_levels else "DownBlock2D" for i in range(levels)]
        up = [name.replace("Down", "Up") for name in reversed(down)]
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, prompt_embeds: Tensor) -> Tensor:
        # The timestep after the last sampler step is negative (t − Δ < 0); the reference feeds 0 there.
        with torch.autocast(device_type=x.device.type, enabled=False):  # runs in fp32, like the reference
            return self.unet(x.float(), t.clamp(min=0), encoder_hidden_states=prompt_embeds.float()).sample
