"""Stable Diffusion 1.5's architecture with random weights, built from configs (no download), for GPU benchmarks
and checks: UNet (860 M parameters), VAE, a CLIP-L-sized text encoder, and a CLIP ViT-L/14 + LAION-head aesthetic
reward. Saved with ``save_pretrained`` so they load through the same code path as the real checkpoints.

    python -m gflowdiff.zoo.sd15_random --out /tmp/sd15   # → /tmp/sd15/pipeline, /tmp/sd15/clip, /tmp/sd15/head.pth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gflowdiff.zoo.tiny_sd import build_tiny_clip_tokenizer, sd_scheduler, write_model_index

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_sd15_pipeline(directory: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """SD-1.5's UNet/VAE/text-encoder configs, random weights stored in ``dtype``. The tokenizer is a character-level
    CLIPTokenizer with SD's 77-token length (the vocabulary is irrelevant to speed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer", model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    CLIPTextModel(text_config).to(dtype).save_pretrained(directory / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    unet.to(dtype).save_pretrained(directory / "unet")
    del unet
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    vae.to(dtype).save_pretrained(directory / "vae")
    sd_scheduler().save_pretrained(directory / "scheduler")
    write_model_index(directory)
    return directory


def build_clip_l_aesthetic(directory: Path) -> tuple[Path, Path]:
    """A random CLIP ViT-L/14 (vision tower at full size, a small text tower) with its preprocessing, and a random
    LAION aesthetic head. Returns (clip folder, head file) for ``AestheticReward(clip_model, head_path)``."""
    from transformers import CLIPConfig, CLIPModel

    from gflowdiff.rewards.aesthetic import LaionMLPHead

    torch.manual_seed(1)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14)  # fmt: skip
    text = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(
        directory / "clip"
    )
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": 224},
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
    }  # fmt: skip
    (directory / "clip" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    head = directory / "head.pth"
    torch.save(LaionMLPHead(768).state_dict(), head)
    return directory / "clip", head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    build_sd15_pipeline(args.out / "pipeline")
    build_clip_l_aesthetic(args.out)
    print(f"wrote {args.out}/pipeline, {args.out}/clip, {args.out}/head.pth")


if __name__ == "__main__":
    main()
