"""``torch.compile`` of the networks a training step and a rollout run (issue 7: speed without changing the math).

At SD-1.5 size and B ≤ 8 an eager step spends much of its time launching small kernels: the unmerged LoRA alone adds
five per adapted layer, and GroupNorm/SiLU chains at 512² in the VAE decoder are memory-bound. Compiling fuses them.
The same module objects are compiled in place (``nn.Module.compile``), so parameter names, checkpoints, peft's adapter
switches and the pretrained pass (adapters disabled) are unchanged; each (grad mode, adapters on/off, shape) variant
compiles once, on its first call (1–2 minutes per variant for the SD-1.5 UNet on a GPU machine; far longer on CPU).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_networks(
    policy: nn.Module,
    flow_head: nn.Module | None,
    reward: nn.Module,
    backend: str = "inductor",
    include_reward: bool = True,
) -> list[str]:
    """Compile the UNet, the VAE decoder, the flow head and the reward's sub-networks in place. Returns their names.
    A variant compiles for the first batch size it sees and, at the second, once more for any batch size (torch's
    automatic dynamic shapes): marking the batch dynamic from the start was tried and made tracing ~60 % slower.

    The reward is compiled per child module, not as a whole: its ``__call__`` takes a list of prompts that may go
    through a tokenizer, which would only cause graph breaks.
    """
    # The objectives take several vector-Jacobian products through one graph (retain_graph=True); AOTAutograd's
    # buffer donation assumes a single backward and refuses that.
    torch._functorch.config.donated_buffer = False
    # variants per network: grad on/off × adapters on/off, each compiled twice at most (static, then dynamic)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 16))
    networks: dict[str, nn.Module] = {"unet": policy.unet}
    if policy.vae is not None:
        networks["vae.decoder"] = policy.vae.decoder
    if flow_head is not None:
        networks["flow_head"] = flow_head
    for name, child in reward.named_children() if include_reward else ():
        if any(True for _ in child.parameters()):
            networks[f"reward.{name}"] = child
    for network in networks.values():
        network.compile(backend=backend)
    return list(networks)
