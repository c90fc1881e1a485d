"""A tiny random Stable-Diffusion-3 pipeline built from configs (nothing downloaded), saved with ``save_pretrained``
in the layout ``StableDiffusion3Pipeline.from_pretrained`` reads: SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler
(shift 3), two CLIPTextModelWithProjection encoders (CLIP-L's and CLIP-G's roles), a T5EncoderModel with a T5 tokenizer
built locally, and an AutoencoderKL with SD3's latent conventions (16 channels, no quant convs, shift and scaling
factors) (tests of the model adapters).

Sizes: the two CLIP encoders have hidden size 16 each (their concatenation, 32, is zero-padded to the T5 width as
``encode_prompt`` does) and pooled projections of 16 each (``pooled_projection_dim`` 32); T5 has d_model 32 =
``joint_attention_dim``; the transformer has 2 layers of 2 heads × 8, patch 2, on 8×8×16 latents.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from gflowdiff.zoo.tiny_sd import build_tiny_clip_tokenizer
from gflowdiff.zoo.tiny_sdxl import tiny_clip_config, tiny_vae

TINY_PROJECTION_DIM = 16  # each CLIP encoder's pooled embedding; the transformer's pooled input is both, concatenated
TINY_T5_WIDTH = 32  # T5 d_model = the transformer's joint_attention_dim
SD3_LATENT_CHANNELS = 16
SD3_SCALING_FACTOR = 1.5305  # SD3's VAE: latents = (z − shift) · scaling
SD3_SHIFT_FACTOR = 0.0609


def build_tiny_t5_tokenizer(directory: Path, model_max_length: int = 256):
    """A T5 tokenizer (the ``tokenizers``-backed ``T5TokenizerFast``) over a Unigram vocabulary of single characters
    and the word-start marker "▁": every word becomes "▁" and its characters. Saved as ``tokenizer.json``."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]  # ids 0, 1, 2 as T5's
    pieces += [(symbol, -2.0) for symbol in string.ascii_lowercase + string.digits + ".,'!?-"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def sd3_scheduler():
    """SD3's schedule: rectified flow, 1000 training steps, σ shifted by 3 (σ' = 3σ / (1 + 2σ))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def write_model_index(directory: Path) -> None:
    """``model_index.json`` of a StableDiffusion3Pipeline folder (no image encoder, no feature extractor)."""
    model_index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))


def build_tiny_sd3(directory: Path) -> Path:
    """SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler + 2 × CLIPTextModelWithProjection + T5EncoderModel
    + their tokenizers + AutoencoderKL (SD3 latent conventions), saved under ``directory``."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    directory = Path(directory)
    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer")
    build_tiny_clip_tokenizer(directory / "tokenizer_2")
    tokenizer_3 = build_tiny_t5_tokenizer(directory / "tokenizer_3")
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), TINY_PROJECTION_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), TINY_PROJECTION_DIM))
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=TINY_T5_WIDTH,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_WIDTH,
        caption_projection_dim=16,  # = heads × head dim
        pooled_projection_dim=2 * TINY_PROJECTION_DIM,
        pos_embed_max_size=16,
    )
    vae = tiny_vae(
        latent_channels=SD3_LATENT_CHANNELS,
        scaling_factor=SD3_SCALING_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    text_encoder_2.save_pretrained(directory / "text_encoder_2")
    text_encoder_3.save_pretrained(directory / "text_encoder_3")
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    sd3_scheduler().save_pretrained(directory / "scheduler")
    write_model_index(directory)
    return directory
