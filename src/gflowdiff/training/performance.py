"""Options that change speed or memory, never the math: ``--model.performance.*``.

Which options exist and what each was measured to gain is in docs/performance.md. The LoRA merge while sampling is a
sampler option (``--model.sampler.merge_lora``); the frozen weights' dtype is ``--model.frozen_dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gflowdiff.training.compilation import DEFAULT_BACKEND, CompileScope, check_compile_options, compile_networks
from gflowdiff.training.memory_layout import use_channels_last


@dataclass
class PerformanceConfig:
    """Speed and memory options; the same loss and gradients up to float round-off.

    Args:
        compile: ``torch.compile`` the UNet, VAE decoder, flow head and reward networks (compilation.py). On a GPU
            the first steps and the first rollout compile for minutes at SD-1.5 size (docs/performance.md); on CPU
            compiling takes far longer. Kernels are cached in ``TORCHINDUCTOR_CACHE_DIR`` for restarts.
        compile_scope: ``whole`` compiles the UNet as one graph, ``blocks`` its repeated blocks (less compile
            time; fewer fusions).
        compile_backend: torch.compile backend; ``aot_eager_decomp_partition`` captures the same graphs without
            generating code (for checking that a setup compiles, not for speed).
        channels_last: store the convolution weights of the UNet, VAE, flow head and reward channels-last
            (memory_layout.py); a few per cent faster steps on CPU (docs/performance.md).
        offload_text_encoders: keep the frozen text encoders on the CPU and move them to the accelerator only to
            encode a rollout's prompts (SDXL, SD3's T5-XXL: they are needed for nothing else).
    """

    compile: bool = False
    compile_scope: CompileScope = "whole"
    compile_backend: str = DEFAULT_BACKEND
    channels_last: bool = False
    offload_text_encoders: bool = False

    def __post_init__(self) -> None:
        if self.compile:  # before any heavy loading
            check_compile_options(self.compile_backend, self.compile_scope)


def apply_performance_options(
    config: PerformanceConfig, policy: nn.Module, flow_head: nn.Module | None, reward: nn.Module
) -> None:
    """Channels-last weights first, so that the compiled graphs see the final layout; then compile, in place."""
    if config.channels_last:
        use_channels_last(policy, flow_head, reward)
    if config.compile:
        compile_networks(policy, flow_head, reward, backend=config.compile_backend, scope=config.compile_scope)
