"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, a UNet with the ``text_time`` added
conditioning (pooled text embedding + six size/crop ids), a VAE, ε / v prediction on SD's discrete timesteps.

Conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` build it:
- ``embeds``: the penultimate hidden states of ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (OpenCLIP-G),
  concatenated along the feature axis, (B, 77, 768 + 1280) in SDXL;
- ``pooled``: ``text_encoder_2``'s projected pooled embedding (B, 1280), the UNet's ``text_embeds``;
- ``extra["time_ids"]``: (original size, crop top-left (0, 0), target size) = (H, W, 0, 0, H, W), (B, 6), the image
  side being the UNet's sample size × the VAE's scale factor (1024 in SDXL).
The unconditional branch is zeros (embeddings and pooled) when model_index.json's ``force_zeros_for_empty_prompt``
is true (SDXL-base; the pipeline's default), else the empty prompt's encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.adapters.base import Conditioning
from gflowdiff.diffusion.adapters.stable_diffusion import UNetAdapter, clip_tokens, module_device
from gflowdiff.diffusion.loading import PRETRAINED_OPTION, load_scheduler


class StableDiffusionXLAdapter(UNetAdapter):
    """SDXL: ``tokenizer``/``text_encoder`` (CLIPTextModel, optional as in the refiner) and ``tokenizer_2``/
    ``text_encoder_2`` (CLIPTextModelWithProjection), ``unet``, ``vae``; the scheduler's betas as a DDIMScheduler
    (policy.py's ``load_scheduler``: SDXL ships EulerDiscrete with "leading" timesteps; the model input is the
    DDIM state, i.e. what Euler's ``scale_model_input`` hands the UNet).

    The options are ModelAdapter's.
    """

    pipeline_class_name = "StableDiffusionXLPipeline"
    denoiser_subfolder = "unet"
    lora_layers_keyword = "unet_lora_layers"
    kernel_family = "diffusion"
    time_convention = "discrete"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # ModelAdapter's options
        from diffusers import UNet2DConditionModel

        has_first = self.has_component("text_encoder")
        self.tokenizer = self.load_tokenizer("tokenizer") if has_first else None
        self.tokenizer_2 = self.load_tokenizer("tokenizer_2")
        first = self.load_text_encoder("text_encoder", "CLIPTextModel") if has_first else None
        self.set_text_encoder("text_encoder", first)
        self.set_text_encoder("text_encoder_2", self.load_text_encoder("text_encoder_2", "CLIPTextModelWithProjection"))
        self.unet = self.load_diffusers(UNet2DConditionModel, "unet")
        self.vae = self.load_vae()
        self.scheduler = load_scheduler(self.path, self.load_kwargs)
        self.force_zeros_for_empty_prompt = bool(self.model_index.get("force_zeros_for_empty_prompt", True))
        self.check_added_conditioning()

    def check_added_conditioning(self) -> None:
        """The UNet's added embedding must read 6 time ids and text_encoder_2's pooled embedding (the pipeline's
        ``_get_add_time_ids`` check), else the folder is not a base SDXL model (a refiner reads 5 ids)."""
        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(
                f"{PRETRAINED_OPTION} {self.path}: unet/config.json has addition_embed_type "
                f"{config.addition_embed_type!r}; an SDXL UNet has 'text_time'"
            )
        passed = config.addition_time_embed_dim * len(self.time_ids_row()) + self.text_encoder_2.config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"{PRETRAINED_OPTION} {self.path}: the UNet's added embedding reads {expected} features, but 6 time "
                f"ids × {config.addition_time_embed_dim} + text_encoder_2's projection_dim make {passed}"
            )

    def time_ids_row(self) -> list[int]:
        """(original H, W; crop top, left; target H, W) for an uncropped square image at the model's size."""
        side = self.image_size
        return [side, side, 0, 0, side, side]

    def encode(self, prompts: list[str]) -> Conditioning:
        tokenizers = [self.tokenizer, self.tokenizer_2] if self.text_encoder is not None else [self.tokenizer_2]
        hidden_states = []
        pooled = None
        for tokenizer, encoder in zip(tokenizers, self.text_encoders, strict=True):
            device = module_device(encoder)
            output = encoder(clip_tokens(tokenizer, prompts).input_ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P); the last such encoder's
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])  # the penultimate layer, (B, L, D_i)
        if pooled is None:
            raise ValueError(f"{PRETRAINED_OPTION} {self.path}: text_encoder_2 gives no pooled (projected) embedding")
        dtype = self.text_encoder_2.dtype
        embeds = torch.cat(hidden_states, dim=-1).to(dtype)  # (B, L, D_1 + D_2)
        time_ids = torch.tensor([self.time_ids_row()] * len(prompts), dtype=dtype)  # (B, 6)
        return Conditioning(embeds, pooled.to(dtype), {"time_ids": time_ids})

    def unconditional(self, batch_size: int) -> Conditioning:
        if not self.force_zeros_for_empty_prompt:
            return super().unconditional(batch_size)
        # the pipeline's torch.zeros_like(prompt_embeds / pooled_prompt_embeds), without running the encoders
        width = sum(encoder.config.hidden_size for encoder in self.text_encoders)
        length = self.tokenizer_2.model_max_length
        options = {"dtype": self.text_encoder_2.dtype, "device": self.device}
        embeds = torch.zeros(batch_size, length, width, **options)
        pooled = torch.zeros(batch_size, self.text_encoder_2.config.projection_dim, **options)
        time_ids = torch.tensor([self.time_ids_row()] * batch_size, **options)
        return Conditioning(embeds, pooled, {"time_ids": time_ids})

    def model_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.frozen_dtype
        added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.extra["time_ids"].to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added).sample
