"""``gflowdiff sample``: write PNGs of a checkpoint's samples for given prompts and seeds.

    gflowdiff sample --ckpt_path runs/<name>/version_0/checkpoints/last.ckpt --prompts "a cat" "a dog" --seeds 0 1
    gflowdiff sample --pretrained_model embedded:digits --prompts "3" --seeds 0 1 2     # the pretrained model

Each (prompt, seed) is one trajectory of the policy's own sampler (diffusion/sampling.py, the training sampler: DDIM η,
CFG) drawn from ``torch.Generator().manual_seed(seed)``, so an image depends on its prompt and seed only: the same seed
reproduces it, whatever the other prompts. Without ``--ckpt_path`` the pretrained model is sampled (and the command says
so). Files: ``<out>/<index>_<prompt>_seed<S>.png``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout

PRETRAINED_NOTICE = (
    "gflowdiff sample: no --ckpt_path given: sampling the PRETRAINED model {model!r}. "
    "Pass --ckpt_path <run>/checkpoints/last.ckpt to sample a fine-tuned run."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gflowdiff sample", description="Write PNGs of a checkpoint's (or the pretrained model's) samples."
    )
    parser.add_argument(
        "--ckpt_path", type=Path, help="a gflowdiff checkpoint (.ckpt); without it: the pretrained model"
    )
    parser.add_argument(
        "--pretrained_model",
        default="embedded:digits",
        help="without --ckpt_path: hub id, local diffusers folder or embedded:digits (default: %(default)s)",
    )
    parser.add_argument("--prompts", nargs="+", required=True, help="one image per prompt and seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: %(default)s)")
    parser.add_argument("--num_inference_steps", type=int, help="default: the checkpoint's sampler (pretrained: 50)")
    parser.add_argument("--guidance_scale", type=float, help="default: the checkpoint's sampler (pretrained: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_policy(args: argparse.Namespace) -> tuple[DiffusionPolicy, SamplerConfig]:
    """The fine-tuned policy and sampler of ``--ckpt_path``, or the pretrained model with the default sampler."""
    if args.ckpt_path is None:
        print(PRETRAINED_NOTICE.format(model=args.pretrained_model), file=sys.stderr)
        return DiffusionPolicy(args.pretrained_model), SamplerConfig()
    from gflowdiff.training.loading import load_trained_module

    if not args.ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path: {str(args.ckpt_path)!r} is not a file")
    module = load_trained_module(args.ckpt_path)
    return module.policy, module.sampler


def sampler_with_overrides(sampler: SamplerConfig, args: argparse.Namespace) -> SamplerConfig:
    """``sampler`` with the --num_inference_steps / --guidance_scale the user gave (validated by SamplerConfig)."""
    steps = sampler.num_inference_steps if args.num_inference_steps is None else args.num_inference_steps
    guidance = sampler.guidance_scale if args.guidance_scale is None else args.guidance_scale
    if guidance < 0:
        raise ValueError(f"--guidance_scale must be >= 0 (got {guidance}; 1 disables guidance)")
    return SamplerConfig(steps, guidance, sampler.eta, sampler.merge_lora)


def to_pil(image: Tensor):
    """A (C, H, W) image in [0, 1] as an 8-bit PIL image (grey for one channel, RGB for three)."""
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy(), mode="L")
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")


def file_name(index: int, prompt: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "empty"
    return f"{index:02d}_{slug}_seed{seed}.png"


def write_samples(policy: DiffusionPolicy, sampler: SamplerConfig, prompts: list[str], seeds: list[int], out: Path):
    """One PNG per (prompt, seed); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, prompt in enumerate(prompts):
        for seed in seeds:
            rollout = sample_rollout(policy, [prompt], None, sampler, torch.Generator().manual_seed(seed))
            path = out / file_name(index, prompt, seed)
            to_pil(rollout.images[0]).save(path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    policy, sampler = load_policy(args)
    sampler = sampler_with_overrides(sampler, args)
    policy = policy.to(args.device).eval()
    paths = write_samples(policy, sampler, args.prompts, args.seeds, args.out)
    print(f"gflowdiff sample: wrote {len(paths)} images to {args.out}", file=sys.stderr)
    return paths
