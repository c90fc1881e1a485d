"""A tiny random Stable-Diffusion-style pipeline built from configs (nothing downloaded): UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer and DDIMScheduler with SD-1.5's conventions, saved with
``save_pretrained`` so it loads through the same path as SD (tests, benchmarks, smoke runs)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_TEXT_HIDDEN = 16


def build_tiny_clip_tokenizer(directory: Path, model_max_length: int = 16):
    """A real CLIPTokenizer over single characters (no merges): every word becomes its characters."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def sd_scheduler():
    """SD-1.5's noise schedule as a diffusers DDIMScheduler: 1000 steps, scaled-linear β, "leading" offset 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def write_model_index(directory: Path) -> None:
    """``model_index.json`` of a StableDiffusionPipeline folder (no safety checker, no feature extractor)."""
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(model_index))


def build_tiny_sd(directory: Path) -> Path:
    """UNet2DConditionModel + AutoencoderKL + CLIPTextModel + CLIPTokenizer + DDIMScheduler, SD-1.5 conventions."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    unet.save_pretrained(directory / "unet")
    vae.save_pretrained(directory / "vae")
    sd_scheduler().save_pretrained(directory / "scheduler")
    write_model_index(directory)
    return directory
