"""The diffusion policy: a model family's components (diffusion/adapters/) with a peft LoRA on the denoiser.

One loading path for every model: ``from_pretrained`` on a hub id or a local folder in the family's diffusers layout
(``model_index.json`` names the pipeline; SD and SDXL have ``unet/``, SD3 ``transformer/``; ``vae/`` is optional). The
embedded digits models are such folders inside the package (``embedded:digits``, ``embedded:digits_flow``). The
pretrained reference policy P_F^# is the same denoiser with its adapters disabled, so there is never a second copy in
memory. Each sampler step is the family's transition kernel (:meth:`DiffusionPolicy.transition_step`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.adapter_rows import LoraRowMask, all_rows
from gflowdiff.diffusion.adapters import load_adapter
from gflowdiff.diffusion.conditioning import Conditioning
from gflowdiff.diffusion.kernels import DDIMODE, DDPMKernel, EulerODE, FlowSDEKernel, TransitionStep, flow_signal
from gflowdiff.diffusion.loading import (  # noqa: F401 (re-exported: policy.py was their home)
    EMBEDDED_MODELS,
    PRETRAINED_OPTION,
    check_lora_targets,
    check_scheduler_config,
    load_model_index,
    load_scheduler,
    resolve_pretrained_path,
    square_sample_size,
)
from gflowdiff.diffusion.math import alpha_bar, epsilon_from_model_output, previous_timesteps


@dataclass
class LoRAConfig:
    """LoRA on the UNet's attention projections (docs/method.md §4.1: rank 8, alpha 8, Gaussian init, B = 0).

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (scale = alpha / rank).
        target_modules: names of the UNet Linear layers that get an adapter.
    """

    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("--model.lora.rank must be >= 1")
        if not self.alpha > 0:
            raise ValueError("--model.lora.alpha must be > 0")
        if not self.target_modules:
            raise ValueError("--model.lora.target_modules must name at least one layer (e.g. [to_q, to_k, to_v])")


class DiffusionPolicy(nn.Module):
    """The denoiser + LoRA of one model family (diffusion/adapters/), with the sampler's noise schedule.

    The adapter's components are registered here under the family's names (``unet`` or ``transformer``,
    ``text_encoder``…, ``vae``), so trainable-state names are the same as before adapters existed
    (``policy.unet.…lora_A…``). Frozen components are stored in ``frozen_dtype``; LoRA parameters are always fp32.

    Args:
        pretrained_model: hub id, local diffusers folder or ``embedded:<name>``.
        revision: hub revision.
        lora: LoRA rank, alpha and target modules.
        frozen_dtype: dtype of the frozen components.
        adapter: the model family by name (``stable_diffusion``, ``stable_diffusion_xl``, ``stable_diffusion_3``);
            default: chosen by the folder's ``model_index.json``.
        offload_text_encoders: keep the text encoders on the CPU except while encoding prompts (large models).
    """

    def __init__(
        self,
        pretrained_model: str,
        revision: str | None = None,
        lora: LoRAConfig | None = None,
        frozen_dtype: torch.dtype = torch.float32,
        adapter: str | None = None,
        offload_text_encoders: bool = False,
    ):
        super().__init__()
        lora = lora or LoRAConfig()
        model = load_adapter(
            pretrained_model,
            adapter=adapter,
            revision=revision,
            frozen_dtype=frozen_dtype,
            offload_text_encoders=offload_text_encoders,
        )
        object.__setattr__(self, "adapter", model)  # not a submodule: its components are registered below
        for name, child in model.named_children():
            self.add_module(name, child)
        if "vae" not in self._modules:
            self.vae = None  # a pixel-space model: the state is the image
        self.frozen_dtype = frozen_dtype
        self.adapters_active = True  # False inside reference()
        self.kernel_family = model.kernel_family
        self.latent_size = model.latent_size
        model.add_lora(lora.rank, lora.alpha, list(lora.target_modules))  # lora_B = 0: step 0 is the pretrained model
        self.lora_row_mask = LoraRowMask(self.denoiser)
        self.prediction_type = model.prediction_type  # what the denoiser outputs; kernel_output → ε̂
        if self.kernel_family == "diffusion":
            self.scheduler = model.scheduler
            self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float().clone(), persistent=False)
            self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.text_hidden_size = int(self.encode_prompts([""]).embeds.shape[-1])

    # ---- shapes ------------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The network with the LoRA: the UNet, or SD3's transformer."""
        return self.adapter.denoiser

    @property
    def latent_channels(self) -> int:
        return self.adapter.latent_channels

    @property
    def num_train_timesteps(self) -> int:
        return self.adapter.num_train_timesteps

    def lora_parameters(self) -> list[nn.Parameter]:
        return self.adapter.lora_parameters()

    def lora_state_dict(self) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    # ---- computations ------------------------------------------------------------------------------------------
    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        """The denoiser's timestep at each sampler step: DDPM's integer t ("leading" spacing), or for flow models
        σ·num_train_timesteps (the transformer's time axis, σ from 1 towards 0)."""
        if self.kernel_family == "flow":
            return self.adapter.timestep(self.adapter.sigmas(num_inference_steps)[:-1])
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps.clone().long()

    def step_times(self, num_inference_steps: int) -> tuple[Tensor, Tensor]:
        """(timesteps, prev_timesteps) of the sampler's steps: t → t − Δ (negative after the last DDPM step), or
        σ_j → σ_{j+1} on the flow model's axis (0 after the last)."""
        if self.kernel_family == "flow":
            times = self.adapter.timestep(self.adapter.sigmas(num_inference_steps))
            return times[:-1], times[1:]
        timesteps = self.inference_timesteps(num_inference_steps)
        return timesteps, previous_timesteps(timesteps, self.num_train_timesteps, num_inference_steps)

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        if self.kernel_family == "flow":
            return flow_signal(timesteps.float() / self.num_train_timesteps)
        return alpha_bar(self.alphas_cumprod, timesteps, self.final_alpha_cumprod)

    def transition_step(self, t: Tensor, t_prev: Tensor, eta: float) -> TransitionStep:
        """The sampler steps t → t_prev (per-sample (B,) timesteps) as the sampler and the objectives see them:
        DDIM-η on ᾱ for diffusion models; for flow models the SDE with the ODE's marginals at noise level a = η on
        σ = t / num_train_timesteps (docs/method.md §10). η = 0 is the deterministic sampler of each family (the
        Euler ODE, DDIM η = 0): no transition density, for ReFL, DRaFT and evaluation only."""
        if self.kernel_family == "flow":
            scale = self.num_train_timesteps
            kernel = FlowSDEKernel(eta) if eta > 0 else EulerODE()
            return TransitionStep.of(kernel, t.float() / scale, t_prev.float() / scale)
        return TransitionStep.of(DDPMKernel(eta) if eta > 0 else DDIMODE(), self.alpha_bar(t), self.alpha_bar(t_prev))

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The denoiser's conditioning for each prompt, as the family's pipeline builds it (no gradients)."""
        return self.adapter.encode_prompts(list(prompts))

    def unconditional(self, batch_size: int) -> Conditioning:
        """The CFG branch's conditioning, as the family's pipeline builds it without a negative prompt."""
        return self.adapter.unconditional(batch_size)

    def kernel_output(
        self,
        x: Tensor,
        t: Tensor,
        prompt_embeds: Conditioning,
        negative_embeds: Conditioning,
        guidance_scale: float,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """The model output the transition kernel takes, CFG-combined (out_u + w·(out_c − out_u)) in fp32 from one
        denoiser call on the batch [uncond; cond] (2B): for diffusion models ε̂ (the output read as the scheduler's
        ``prediction_type`` says, ε, v or x̂0, and converted), for flow models the velocity v. ``lora_rows`` (B,)
        bool: the LoRA acts only on these rows; the others get the pretrained policy's output.
        """
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        output = self.guided_output(x, t, prompt_embeds, negative_embeds, guidance_scale, lora_rows)
        if self.kernel_family == "flow":
            return output  # the velocity: what the flow kernels take
        return epsilon_from_model_output(output, x.float(), self.alpha_bar(t), self.prediction_type)

    def guided_output(
        self,
        x: Tensor,
        t: Tensor,
        prompt_embeds: Conditioning,
        negative_embeds: Conditioning,
        guidance_scale: float,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """The CFG-combined raw denoiser output (``prediction_type``) in fp32; t is (B,)."""
        guided = guidance_scale != 1.0
        rows = torch.cat([lora_rows, lora_rows]) if guided and lora_rows is not None else lora_rows
        with self.lora_on_rows(rows):
            return self.adapter.denoise(x, t, prompt_embeds, negative_embeds if guided else None, guidance_scale)

    def lora_on_rows(self, rows_on: Tensor | None) -> AbstractContextManager:
        """The LoRA on the rows where ``rows_on`` is True only (:mod:`gflowdiff.diffusion.adapter_rows`); nothing to
        do when every row has it."""
        return nullcontext() if all_rows(rows_on) else self.lora_row_mask.only(rows_on.to(self.adapter.device))

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Run the pretrained policy P_F^#: the same UNet with its LoRA adapters disabled."""
        self.denoiser.disable_adapters()
        self.adapters_active = False
        try:
            yield
        finally:
            self.denoiser.enable_adapters()
            self.adapters_active = True

    def should_merge_lora(self, merge: bool | None) -> bool:
        """``None`` (auto): merge only when the frozen weights are fp32, where W + ΔW rounds like the unmerged sum.
        In bf16 the merged weight is rounded to W's bf16 grid, which can erase a young LoRA's small ΔW."""
        return self.frozen_dtype == torch.float32 if merge is None else merge

    @contextmanager
    def merged_lora(self) -> Iterator[None]:
        """Inference with each LoRA update folded into its base weight (one matmul per layer instead of three).

        The original weight tensors are put back afterwards, bit for bit: no subtract-back rounding drift over
        thousands of steps. Without gradients only (the merged weights are not the trained parameters).
        """
        from peft.tuners.lora import LoraLayer

        if not self.adapters_active or torch.is_grad_enabled():
            yield  # the pretrained policy needs no merge; training passes keep the LoRA branch
            return
        saved = []
        for layer in self.denoiser.modules():
            if not isinstance(layer, LoraLayer):
                continue
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters if name in layer.lora_A)
            saved.append((base, base.weight.data))
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        self.denoiser.disable_adapters()  # the LoRA branch now lives in the weights
        try:
            yield
        finally:
            self.denoiser.enable_adapters()
            for base, original in saved:
                base.weight.data = original

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1], fp32 (pixel-space models: the state is the image in [-1, 1]). The clamp
        zeroes gradients of saturated pixels, as the reference does."""
        return self.adapter.decode(latents)
