"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet2DConditionModel, an
optional VAE (pixel space without one, as the embedded digits model), ε / v / x̂0 prediction on SD's discrete
timesteps. Loading follows policy.py (its scheduler checks and DDIM conversion)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.adapters.base import Conditioning, ModelAdapter
from gflowdiff.diffusion.loading import load_scheduler


def clip_tokens(tokenizer, prompts: list[str], max_length: int | None = None):
    """Tokens padded (and truncated) to ``max_length`` (default: the tokenizer's ``model_max_length``), as every
    SD-family pipeline tokenizes for its CLIP encoders: ``input_ids`` and ``attention_mask``, (B, L) each."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class UNetAdapter(ModelAdapter):
    """What the UNet families (SD, SDXL) share: the ``unet`` is the denoiser, and its DDIM-converted ``scheduler``
    gives the time axis and what the UNet predicts."""

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


class StableDiffusionAdapter(UNetAdapter):
    """SD 1.x / 2.x: ``text_encoder`` + ``tokenizer``, ``unet``, optional ``vae``; the scheduler's betas as a
    DDIMScheduler (policy.py's ``load_scheduler``: the sampler's own DDIM math).

    The options are ModelAdapter's.
    """

    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_subfolder = "unet"
    lora_layers_keyword = "unet_lora_layers"
    kernel_family = "diffusion"
    time_convention = "discrete"
    text_encoder_names = ("text_encoder",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # ModelAdapter's options
        from diffusers import UNet2DConditionModel

        self.tokenizer = self.load_tokenizer("tokenizer", "AutoTokenizer")
        self.set_text_encoder("text_encoder", self.load_text_encoder("text_encoder", "CLIPTextModel"))
        self.unet = self.load_diffusers(UNet2DConditionModel, "unet")
        self.vae = self.load_vae()
        self.scheduler = load_scheduler(self.path, self.load_kwargs)

    def encode(self, prompts: list[str]) -> Conditioning:
        """The text encoder's last hidden states (B, L, D), as ``StableDiffusionPipeline.encode_prompt`` (no clip
        skip; an attention mask only where the encoder's config asks for one, as SD 2.x's does not)."""
        tokens = clip_tokens(self.tokenizer, prompts)
        device = module_device(self.text_encoder)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), **kwargs)[0]
        return Conditioning(embeds.to(self.frozen_dtype))

    def model_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.unet(x.to(self.frozen_dtype), t, encoder_hidden_states=cond.embeds.to(self.frozen_dtype)).sample
