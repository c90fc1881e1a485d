"""``torch.compile`` of the networks a training step and a rollout run (issue 7: speed without changing the math).

At SD-1.5 size and B ≤ 8 an eager step spends much of its time launching small kernels: the unmerged LoRA alone adds
five per adapted layer, and GroupNorm/SiLU chains at 512² in the VAE decoder are memory-bound. Compiling fuses them.
Modules are compiled in place (``nn.Module.compile``), so parameter names, checkpoints, peft's adapter switches and
the pretrained pass (adapters disabled) are unchanged. Each variant (grad on/off × adapters on/off) compiles on its
first call and, at its second batch size, once more for every batch size (torch's automatic dynamic shapes).

Scope ``whole`` (default) compiles the UNet as one graph; ``blocks`` (regional compilation) compiles its attention
and ResNet blocks, so that blocks of one shape share a compiled graph: less compile time (paid again at every
(re)start of a job unless ``TORCHINDUCTOR_CACHE_DIR`` keeps the kernels), for fewer fusions across blocks. On a GPU
at SD-1.5 size, compiling (``whole``) makes the residual ∇-DB training step, the rollout and the VAE decoder's passes
faster, after minutes of compiling; on a CPU the first call, graph capture alone, takes several times an eager call,
less in ``blocks`` than ``whole`` (docs/performance.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CompileScope = Literal["blocks", "whole"]
DEFAULT_BACKEND = "inductor"  # CPU tests use "aot_eager_decomp_partition": the same graphs, no code generation
# the UNet's repeated blocks: attention (with the LoRA layers) and ResNet blocks, nearly all of its work
UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def check_compile_options(backend: str, scope: str) -> None:
    """Fail early, naming the option, on an unknown backend or scope."""
    if scope not in ("blocks", "whole"):
        raise ValueError(f"--model.performance.compile_scope must be blocks or whole, got {scope!r}")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--model.performance.compile_backend: unknown backend {backend!r}; known: {', '.join(known)}")


def compile_networks(
    policy: nn.Module,
    flow_head: nn.Module | None,
    reward: nn.Module,
    backend: str = DEFAULT_BACKEND,
    include_reward: bool = True,
    scope: CompileScope = "whole",
) -> list[str]:
    """Compile the UNet (``scope``), the VAE decoder, the flow head and the reward's sub-networks in place. Returns
    the names of what was compiled.

    The reward is compiled per child module, not as a whole: its ``__call__`` takes a list of prompts that may go
    through a tokenizer, which would only cause graph breaks.
    """
    check_compile_options(backend, scope)
    # The objectives take several vector-Jacobian products through one graph (retain_graph=True); AOTAutograd's
    # buffer donation assumes a single backward and refuses that.
    torch._functorch.config.donated_buffer = False
    # variants per compiled code: grad on/off × adapters on/off × (static, dynamic); blocks of several shapes share one
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    networks: dict[str, nn.Module] = {}
    if scope == "whole":
        networks["unet"] = policy.denoiser
    else:
        for name, module in policy.denoiser.named_modules():
            if type(module).__name__ in UNET_BLOCKS:
                networks[f"unet.{name}"] = module
    vae = getattr(policy, "vae", None)
    if vae is not None:
        networks["vae.decoder"] = vae.decoder
    if flow_head is not None:
        networks["flow_head"] = flow_head
    for name, child in reward.named_children() if include_reward else ():
        if next(child.parameters(), None) is not None:
            networks[f"reward.{name}"] = child
    for network in networks.values():
        network.compile(backend=backend)
    return list(networks)


def describe(names: list[str]) -> str:
    """A short summary of compile_networks' result: the UNet's blocks are counted, not listed."""
    blocks = [n for n in names if n.startswith("unet.")]
    rest = [n for n in names if not n.startswith("unet.")]
    return ", ".join(([f"{len(blocks)} UNet blocks"] if blocks else []) + rest)
