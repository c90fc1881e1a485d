"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): CLIP-L, CLIP-G and an optional T5 text encoder, an
SD3Transformer2DModel (MMDiT) predicting the rectified-flow velocity, a VAE with SD3's latent shift and scale.

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it (no clip skip):
- each CLIP encoder's penultimate hidden states, both padded to the first tokenizer's ``model_max_length`` (77),
  concatenated along the features (768 + 1280 in SD3) and zero-padded to the T5 width (``joint_attention_dim``, 4096);
- the T5 encoder's last hidden states at ``max_sequence_length`` tokens, appended along the sequence: ``embeds`` is
  (B, 77 + max_sequence_length, 4096). A folder without ``text_encoder_3`` gets zeros there, as the pipeline does;
- ``pooled``: both CLIP encoders' projected pooled embeddings, concatenated (B, 768 + 1280), the transformer's
  ``pooled_projections``.

Time: x_σ = (1 − σ)·x0 + σ·ε, σ from 1 (noise) to 0 (data); the transformer takes ``timestep`` = σ·1000
(``num_train_timesteps``), what FlowMatchEulerDiscreteScheduler's ``timesteps`` hold; its output is v ≈ ε − x0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.adapters.base import Conditioning, ModelAdapter
from gflowdiff.diffusion.adapters.stable_diffusion import clip_tokens, module_device

T5_DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


class StableDiffusion3Adapter(ModelAdapter):
    """SD3 / SD3.5: ``tokenizer``/``text_encoder`` and ``tokenizer_2``/``text_encoder_2`` (CLIPTextModelWithProjection
    each), optional ``tokenizer_3``/``text_encoder_3`` (T5EncoderModel), ``transformer``, optional ``vae``, and the
    FlowMatchEulerDiscreteScheduler (its shifted σ schedule).

    Args:
        max_sequence_length: the T5 part's length in tokens. ``None``: 256 (the pipeline's default) when the folder
            has a T5 encoder; without one (``text_encoder_3: [null, null]``) the pipeline pads zeros of this length,
            and ``None`` means the CLIP tokenizer's ``model_max_length``: the length gflowdiff's own T5-less flow
            models are trained with. Give the length a model was trained with; the pipeline's 256 for a T5-less
            model needs ``max_sequence_length: 256`` here.

    The other options are ModelAdapter's.
    """

    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_subfolder = "transformer"
    lora_layers_keyword = "transformer_lora_layers"
    kernel_family = "flow"
    time_convention = "sigma"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, *args, max_sequence_length: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)  # ModelAdapter's options
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        if max_sequence_length is not None and not 1 <= max_sequence_length <= 512:
            raise ValueError("max_sequence_length must be in [1, 512] (StableDiffusion3Pipeline's limit) or None")
        self.tokenizer = self.load_tokenizer("tokenizer")
        self.tokenizer_2 = self.load_tokenizer("tokenizer_2")
        self.set_text_encoder("text_encoder", self.load_text_encoder("text_encoder", "CLIPTextModelWithProjection"))
        self.set_text_encoder("text_encoder_2", self.load_text_encoder("text_encoder_2", "CLIPTextModelWithProjection"))
        has_t5 = self.has_component("text_encoder_3")
        self.tokenizer_3 = self.load_tokenizer("tokenizer_3", "T5TokenizerFast") if has_t5 else None
        self.set_text_encoder(
            "text_encoder_3", self.load_text_encoder("text_encoder_3", "T5EncoderModel") if has_t5 else None
        )
        self.transformer = self.load_diffusers(SD3Transformer2DModel, "transformer")
        self.vae = self.load_vae()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self.path, subfolder="scheduler", **self.load_kwargs
        )
        default = T5_DEFAULT_MAX_SEQUENCE_LENGTH if has_t5 else self.tokenizer.model_max_length
        self.max_sequence_length = max_sequence_length or default

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return "velocity"

    def sigmas(self, num_inference_steps: int) -> Tensor:
        """The scheduler's σ for ``num_inference_steps`` steps (its shift applied), 1 → 0, with the final 0:
        (num_inference_steps + 1,) fp32. A scheduler with ``use_dynamic_shifting`` gets the resolution-dependent
        shift μ the pipeline passes it (:meth:`dynamic_shift`)."""
        options = {"mu": self.dynamic_shift()} if self.scheduler.config.get("use_dynamic_shifting") else {}
        self.scheduler.set_timesteps(num_inference_steps, **options)
        return self.scheduler.sigmas.float().clone()

    def dynamic_shift(self) -> float:
        """μ for the latent's token count n = (latent size / patch size)², as ``StableDiffusion3Pipeline`` computes
        it: linear in n from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (the
        scheduler config's values, else the pipeline's defaults 0.5 at 256 and 1.16 at 4096)."""
        config = self.scheduler.config
        tokens = (self.latent_size // self.transformer.config.patch_size) ** 2
        base_tokens, max_tokens = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
        return base_shift + (max_shift - base_shift) * (tokens - base_tokens) / (max_tokens - base_tokens)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's ``timestep`` for σ: σ·num_train_timesteps."""
        return sigma * self.num_train_timesteps

    def clip_embeds(self, tokenizer, encoder: nn.Module, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(penultimate hidden states (B, L, D), projected pooled embedding (B, P)) of one CLIP encoder; both
        tokenizers pad to the *first* tokenizer's length, as the pipeline's ``tokenizer_max_length``."""
        ids = clip_tokens(tokenizer, prompts, max_length=self.tokenizer.model_max_length).input_ids
        output = encoder(ids.to(module_device(encoder)), output_hidden_states=True)
        return output.hidden_states[-2], output[0]

    def t5_embeds(self, prompts: list[str]) -> Tensor:
        """T5's last hidden states (B, max_sequence_length, joint_attention_dim), or zeros without a T5 encoder."""
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, dtype=self.text_encoder.dtype)
        tokens = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        encoder = self.text_encoder_3
        return encoder(tokens.input_ids.to(module_device(encoder)))[0].to(encoder.dtype)

    def encode(self, prompts: list[str]) -> Conditioning:
        embeds_1, pooled_1 = self.clip_embeds(self.tokenizer, self.text_encoder, prompts)
        embeds_2, pooled_2 = self.clip_embeds(self.tokenizer_2, self.text_encoder_2, prompts)
        clip = torch.cat([embeds_1, embeds_2], dim=-1).to(self.text_encoder.dtype)  # (B, 77, D_1 + D_2)
        t5 = self.t5_embeds(prompts).to(clip.device)  # (B, L_T5, D_T5)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero features up to D_T5
        embeds = torch.cat([clip, t5], dim=-2)  # (B, 77 + L_T5, D_T5)
        return Conditioning(embeds, torch.cat([pooled_1, pooled_2], dim=-1))

    def model_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.frozen_dtype
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
