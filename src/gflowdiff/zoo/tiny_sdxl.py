"""A tiny random Stable-Diffusion-XL pipeline built from configs (nothing downloaded), saved with ``save_pretrained``
in the layout ``StableDiffusionXLPipeline.from_pretrained`` reads: a UNet with SDXL's ``text_time`` added conditioning,
two text encoders (CLIPTextModel, CLIPTextModelWithProjection) with their tokenizers, an AutoencoderKL and SDXL's
EulerDiscreteScheduler (tests of the model adapters).

Sizes: UNet blocks (8, 16) at 8×8 latents, text encoders of hidden size 16 each (cross-attention 32 = their
concatenation), pooled projection 16, time-id embedding 4 per id (6 ids): the UNet's added embedding reads
6·4 + 16 = 40 features, as the pipeline's ``_get_add_time_ids`` checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gflowdiff.zoo.tiny_sd import TINY_TEXT_HIDDEN, build_tiny_clip_tokenizer

TINY_PROJECTION_DIM = 16  # text_encoder_2's pooled embedding
TINY_TIME_EMBED_DIM = 4  # addition_time_embed_dim, per time id
NUM_TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)


def sdxl_scheduler():
    """SDXL-base's schedule: EulerDiscreteScheduler, 1000 steps, scaled-linear β 0.00085 → 0.012, "leading"."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_clip_config(vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def tiny_vae(latent_channels: int = 4, **conventions):
    """A two-block AutoencoderKL (2× down-sampling); ``conventions``: scaling/shift factors, quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
        **conventions,
    )


def write_model_index(directory: Path) -> None:
    """``model_index.json`` of a StableDiffusionXLPipeline folder (no image encoder, no feature extractor)."""
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,  # as SDXL-base: the unconditional embeddings are zeros
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))


def build_tiny_sdxl(directory: Path) -> Path:
    """UNet2DConditionModel (text_time) + AutoencoderKL + CLIPTextModel + CLIPTextModelWithProjection + two
    CLIPTokenizers + EulerDiscreteScheduler, SDXL conventions, saved under ``directory``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer")
    build_tiny_clip_tokenizer(directory / "tokenizer_2")
    text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), TINY_PROJECTION_DIM))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,  # both encoders' penultimate hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_TIME_IDS * TINY_TIME_EMBED_DIM + TINY_PROJECTION_DIM,
        norm_num_groups=4,
    )
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scaling factor
    text_encoder.save_pretrained(directory / "text_encoder")
    text_encoder_2.save_pretrained(directory / "text_encoder_2")
    unet.save_pretrained(directory / "unet")
    vae.save_pretrained(directory / "vae")
    sdxl_scheduler().save_pretrained(directory / "scheduler")
    write_model_index(directory)
    return directory
