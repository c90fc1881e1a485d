"""Channels-last memory layout for the convolutional networks (issue 7: speed without changing the math).

oneDNN's CPU convolutions and cuDNN's tensor-core kernels work in NHWC ("channels last") and otherwise convert the
layout around each convolution. Converting the weights is enough: a convolution with channels-last weights returns a
channels-last output, so the layout carries through the network and its backward passes. Values are the same up to
float round-off (the kernels sum in another order).

On CPU (fp32) it makes training a few per cent faster with the same results (docs/performance.md; `make benchmark`
prints the step and rollout times). Not measured on GPU, where
PyTorch's GroupNorm has long returned contiguous outputs (pytorch#111824), which would add a layout conversion
around every norm; and inductor picks convolution layouts itself, so a compiled network gains little.
"""

from __future__ import annotations

import torch
from torch import nn


def convolutional_networks(policy: nn.Module, flow_head: nn.Module | None, reward: nn.Module) -> dict[str, nn.Module]:
    """The networks with convolutions that a training step and a rollout run: UNet, VAE, flow head, reward parts."""
    candidates = {"unet": policy.denoiser, "vae": getattr(policy, "vae", None), "flow_head": flow_head}
    candidates |= {f"reward.{name}": child for name, child in reward.named_children()}
    return {
        name: network
        for name, network in candidates.items()
        if network is not None and any(isinstance(m, nn.Conv2d) for m in network.modules())
    }


def use_channels_last(policy: nn.Module, flow_head: nn.Module | None, reward: nn.Module) -> list[str]:
    """Store the 4-D weights of every convolutional network channels-last, in place; returns their names.

    Parameters stay the same objects (``Module.to`` converts ``.data``), so optimizers, peft's adapters and
    checkpoints are unaffected, and later ``.to(device)`` calls keep the layout.
    """
    networks = convolutional_networks(policy, flow_head, reward)
    for network in networks.values():
        network.to(memory_format=torch.channels_last)
    return list(networks)
