"""The embedded default model: a tiny text-conditioned pixel-space diffusion model of scikit-learn's digits.

It is saved in the same diffusers folder layout as Stable Diffusion (``unet/``, ``scheduler/``, ``text_encoder/``,
``tokenizer/``, ``model_index.json``) and loaded by the same code path (:mod:`gflowdiff.diffusion.policy`). Being
pixel-space, it has no VAE (``model_index.json`` says ``"vae": [null, null]``). A small digit classifier, trained here
too, is the differentiable reward for it (:class:`gflowdiff.rewards.DigitClassifierReward`).

Re-create the shipped weights with ``python -m gflowdiff.zoo.digits`` (``make digits-model``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_MODEL_DIR = WEIGHTS_DIR / "digits"
CLASSIFIER_PATH = WEIGHTS_DIR / "digit_classifier.safetensors"

GENERIC_PROMPT = "a handwritten digit"
DIGIT_WORDS = [str(k) for k in range(10)]
IMAGE_SIZE = 8
MAX_PROMPT_TOKENS = 8  # "<bos> a handwritten digit 3 <eos>" is 6 tokens
TEXT_HIDDEN_SIZE = 32


def digit_prompt(label: int) -> str:
    return f"{GENERIC_PROMPT} {label}"


# --------------------------------------------------------------------------------------------------------------------
# Components, built from configs (no download).
# --------------------------------------------------------------------------------------------------------------------
def build_tokenizer():
    """A word-level tokenizer with CLIP's conventions (bos/eos, padding with eos), savable with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "an", "the", "handwritten", "digit", "number", "of", "photo", "picture", *DIGIT_WORDS]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_PROMPT_TOKENS,
    )


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=0,  # inside the vocab, so pooler_output is well defined
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention only at 4×4: half the cost of attending at 8×8, and a digit's class is a global property.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler():
    """DDIM scheduler with SD-1.5's conventions (leading spacing, offset 1, no clipping); cosine betas for 8×8."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


class DigitClassifier(nn.Module):
    """A small CNN on 8×8 digits in [0, 1]; accepts 1 or 3 channels (3 are averaged to grey)."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 8×8 → 4×4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 4×4 → 2×2
            nn.Flatten(),
            nn.Linear(2 * width * 4, 64),
            nn.SiLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, 64): the feature space for diversity and FID on the embedded model."""
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-1] != IMAGE_SIZE:
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> DigitClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights not found at {path}; run `python -m gflowdiff.zoo.digits`")
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(str(path)))
    return classifier.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------------------------
def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as (N, 1, 8, 8) floats in [-1, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


def training_prompts(labels: torch.Tensor, generator: torch.Generator, p_empty: float, p_generic: float) -> list[str]:
    """Per-image prompts: "" (for classifier-free guidance), the class-free prompt, or the class-specific one."""
    u = torch.rand(len(labels), generator=generator)
    prompts = []
    for ui, label in zip(u.tolist(), labels.tolist(), strict=True):
        if ui < p_empty:
            prompts.append("")
        elif ui < p_empty + p_generic:
            prompts.append(GENERIC_PROMPT)
        else:
            prompts.append(digit_prompt(label))
    return prompts


# --------------------------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------------------------
def train_classifier(
    steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, noise_std: float = 0.1, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train on 1,500 digits with pixel noise and one-pixel shifts (smooth gradients); return held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images()
    images = (images + 1) / 2
    perm = torch.randperm(len(labels), generator=gen)
    train_idx, test_idx = perm[:1500], perm[1500:]
    classifier = DigitClassifier()
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        x = images[idx]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        x = (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(classifier(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"classifier step {step}: loss {loss.item():.4f}", flush=True)
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return classifier.requires_grad_(False), accuracy


def train_diffusion(
    out_dir: Path,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    p_empty: float = 0.1,
    p_generic: float = 0.3,
    seed: int = 0,
    log_every: int = 200,
) -> None:
    """Epsilon-prediction DDPM training of the UNet and the text encoder together; saves a diffusers folder."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images()
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer))
    unet = build_unet()
    scheduler = build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    alphas_cumprod = scheduler.alphas_cumprod
    start, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen)
        x0 = images[idx]
        prompts = training_prompts(labels[idx], gen, p_empty, p_generic)
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, return_tensors="pt").input_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4
        pred = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"diffusion step {step}/{steps}: loss {running:.4f} ({time.time() - start:.0f} s)", flush=True)
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    scheduler.save_pretrained(out_dir / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded digits diffusion model and digit classifier.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for digits/ and the classifier")
    parser.add_argument("--steps", type=int, default=1500, help="diffusion training steps")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--skip-diffusion", action="store_true")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_classifier:
        classifier, accuracy = train_classifier(steps=args.classifier_steps, seed=args.seed)
        save_file(classifier.state_dict(), str(args.out / CLASSIFIER_PATH.name))
        print(f"classifier held-out accuracy: {accuracy:.4f} (297 images)")
    if not args.skip_diffusion:
        train_diffusion(args.out / DIGITS_MODEL_DIR.name, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
