"""The embedded flow-matching model: a tiny text-conditioned rectified-flow transformer of scikit-learn's digits.

It is saved in Stable Diffusion 3's diffusers folder layout (``transformer/``, ``scheduler/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``model_index.json``) with ``"vae"``, ``"text_encoder_3"`` and
``"tokenizer_3"`` null: the state is the 8×8 image in [-1, 1] itself, and the absent T5 is replaced by zeros exactly as
``StableDiffusion3Pipeline.encode_prompt`` does without it. Data, prompts and the tokenizer are those of
:mod:`gflowdiff.zoo.digits`; the shipped digit classifier scores the samples.

Rectified flow as in SD3 (Esser et al. 2024, arXiv 2403.03206, Sec. 2-3): x_s = (1 − s)·x0 + s·ε with s from 1 (noise)
to 0 (data); the transformer predicts the velocity v ≈ ε − x0 and is called with ``timestep = s·1000`` (diffusers'
``FlowMatchEulerDiscreteScheduler``: timesteps = sigmas·num_train_timesteps).

Re-create the shipped weights with ``python -m gflowdiff.zoo.digits_flow`` (``make digits-flow-model``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gflowdiff.zoo.digits import (
    CLASSIFIER_PATH,
    GENERIC_PROMPT,
    IMAGE_SIZE,
    MAX_PROMPT_TOKENS,
    WEIGHTS_DIR,
    build_tokenizer,
    digit_prompt,
    load_classifier,
    load_digit_images,
    training_prompts,
)

DIGITS_FLOW_MODEL_DIR = WEIGHTS_DIR / "digits_flow"
NUM_TRAIN_TIMESTEPS = 1000
# Two CLIP encoders of different widths, as SD3's CLIP-L (768) and CLIP-G (1280); their concatenation (80) is
# zero-padded to the joint attention width (96), as SD3 pads 2048 to T5's 4096, so the padding rule is exercised.
CLIP_L_HIDDEN = 32
CLIP_G_HIDDEN = 48
JOINT_ATTENTION_DIM = 96
POOLED_PROJECTION_DIM = CLIP_L_HIDDEN + CLIP_G_HIDDEN  # each encoder projects to its own width
SAMPLE_STEPS = 20


# --------------------------------------------------------------------------------------------------------------------
# Components, built from configs (no download).
# --------------------------------------------------------------------------------------------------------------------
def build_text_encoder(vocab_size: int, hidden_size: int):
    """A 2-layer CLIP text encoder with projection; SD3 reads its penultimate hidden states and its text_embeds."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=0,  # inside the vocab, so the pooled (eos) position is well defined
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer(patch_size: int = 2, num_layers: int = 4, num_attention_heads: int = 4, head_dim: int = 16):
    from diffusers import SD3Transformer2DModel

    width = num_attention_heads * head_dim
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=width,  # the context stream has the image stream's width
        pooled_projection_dim=POOLED_PROJECTION_DIM,
        # The sin-cos position table is a saved buffer of (max_size)² rows: 96 (SD3's) would be 9,216 rows for 64
        # image tokens; the image's own grid is enough.
        pos_embed_max_size=IMAGE_SIZE // patch_size,
    )


def build_scheduler():
    """SD3's flow-matching Euler scheduler without resolution shift (shift 1: sigmas linear from 1 to 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


def build_pipeline(transformer, scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
    """A StableDiffusion3Pipeline without VAE and T5 (pixel space; the T5 part of the conditioning is zeros)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def load_pipeline(path: str | Path = DIGITS_FLOW_MODEL_DIR):
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"flow digits model not found at {path}; run `python -m gflowdiff.zoo.digits_flow`")
    # diffusers does not read a null entry of model_index.json as "absent" for a required component: name them.
    return StableDiffusion3Pipeline.from_pretrained(str(path), vae=None, text_encoder_3=None, tokenizer_3=None)


def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 2·L, joint_dim), pooled (B, pooled_dim)) by the pipeline's own ``encode_prompt``.

    Without T5, ``encode_prompt`` concatenates CLIP-L's and CLIP-G's penultimate hidden states on the feature axis,
    zero-pads them to ``joint_attention_dim`` and appends ``max_sequence_length`` zero rows for T5; here
    max_sequence_length is the CLIP tokenizer's length L, so the sequence is 2·L tokens. Differentiable (no no_grad).
    """
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=pipe.tokenizer.model_max_length,
    )
    return prompt_embeds, pooled


# --------------------------------------------------------------------------------------------------------------------
# Rectified-flow math (arXiv 2403.03206, Sec. 2).
# --------------------------------------------------------------------------------------------------------------------
def interpolate(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 − s)·x0 + s·ε (Eq. 3 with a_t = 1 − t, b_t = t); s is (B,)."""
    s = s.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dx_s/ds = ε − x0, what the transformer regresses (the conditional flow-matching loss, Eq. 1)."""
    return noise - x0


def sample_noise_levels(n: int, generator: torch.Generator, distribution: str) -> torch.Tensor:
    """s ~ U(0, 1), or logit-normal π_ln(s; 0, 1): sigmoid of a standard normal (Sec. 3.1, "rf/lognorm(0.00, 1.00)")."""
    if distribution == "uniform":
        return torch.rand(n, generator=generator)
    if distribution == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"--noise-levels must be 'uniform' or 'logit_normal', got {distribution!r}")


@torch.no_grad()
def euler_sample(
    transformer,
    scheduler,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    generator: torch.Generator,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The probability-flow ODE by Euler, fp32: x ← x + v·(s_next − s) over the scheduler's sigmas from 1 to 0.

    With ``guidance_scale`` > 1, v = v_uncond + g·(v_cond − v_uncond) with ``uncond`` the "" prompt's encoding (as the
    SD3 pipeline's classifier-free guidance). Returns images in [-1, 1] (clamped), (B, 1, 8, 8).
    """
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.float()  # (steps + 1,), 1 → 0
    batch = prompt_embeds.shape[0]
    x = latents if latents is not None else torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    x = x.float()
    cfg = guidance_scale > 1.0
    if cfg:
        embeds = torch.cat([uncond[0].expand_as(prompt_embeds), prompt_embeds])  # (2B, 2L, joint_dim)
        pooled = torch.cat([uncond[1].expand_as(pooled), pooled])  # (2B, pooled_dim)
    else:
        embeds = prompt_embeds
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if cfg else x
        v = transformer(
            hidden_states=x_in,
            timestep=t.expand(x_in.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + v * (sigmas[i + 1] - sigmas[i])
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    pipe: object  # StableDiffusion3Pipeline
    loss: float  # running (EMA 0.98) velocity MSE at the last step
    seconds: float
    parameters: int  # transformer + both text encoders


def train_flow(
    steps: int = 4500,
    batch_size: int = 128,
    lr: float = 1e-3,
    patch_size: int = 2,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    head_dim: int = 16,
    noise_levels: str = "logit_normal",
    p_empty: float = 0.1,
    p_generic: float = 0.3,
    seed: int = 0,
    log_every: int = 200,
) -> TrainingResult:
    """Flow-matching training of the transformer and both text encoders together, conditioned via ``encode_prompt``.

    No image augmentation, as :func:`gflowdiff.zoo.digits.train_diffusion`; prompts as there (60 % "… k", 30 % generic,
    10 % "" for classifier-free guidance).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images()
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    pipe = build_pipeline(
        build_transformer(patch_size, num_layers, num_attention_heads, head_dim),
        build_scheduler(),
        build_text_encoder(len(tokenizer), CLIP_L_HIDDEN),
        tokenizer,
        build_text_encoder(len(tokenizer_2), CLIP_G_HIDDEN),
        tokenizer_2,
    )
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for module in modules:
        module.train()
    params = [p for module in modules for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    start, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen)
        x0 = images[idx]
        prompts = training_prompts(labels[idx], gen, p_empty, p_generic)
        prompt_embeds, pooled = encode_prompts(pipe, prompts)
        s = sample_noise_levels(batch_size, gen, noise_levels)
        noise = torch.randn(x0.shape, generator=gen)
        pred = pipe.transformer(
            hidden_states=interpolate(x0, noise, s),
            timestep=s * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
        ).sample
        loss = F.mse_loss(pred, velocity_target(x0, noise))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"flow step {step}/{steps}: loss {running:.4f} ({time.time() - start:.0f} s)", flush=True)
    for module in modules:
        module.eval().requires_grad_(False)
    return TrainingResult(pipe, running, time.time() - start, sum(p.numel() for p in params))


def save_flow_model(pipe, out_dir: Path) -> None:
    """``save_pretrained`` of every component, and a model_index.json naming the absent ones null."""
    out_dir = Path(out_dir)
    pipe.transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    pipe.text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    pipe.text_encoder_2.save_pretrained(out_dir / "text_encoder_2", safe_serialization=True)
    pipe.tokenizer.save_pretrained(out_dir / "tokenizer")
    pipe.tokenizer_2.save_pretrained(out_dir / "tokenizer_2")
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    model_index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_3": [None, None],
        "tokenizer_3": [None, None],
        "vae": [None, None],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Evaluation with the shipped digit classifier.
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class PromptEvaluation:
    guidance_scale: float
    histogram: list[int]  # classes of the generic prompt's samples
    fraction_three: float  # of "a handwritten digit 3"'s samples classified as 3


def classify(images: torch.Tensor, classifier=None) -> torch.Tensor:
    """Classes (B,) of images in [-1, 1] by the shipped digit classifier (which reads [0, 1])."""
    classifier = classifier if classifier is not None else load_classifier(CLASSIFIER_PATH)
    with torch.no_grad():
        return classifier((images.clamp(-1, 1) + 1) / 2).argmax(1)


def evaluate(pipe, n: int = 256, guidance_scale: float = 1.0, seed: int = 0, classifier=None) -> PromptEvaluation:
    """Euler-ODE samples (20 steps) of the generic prompt and of "… 3", classified."""
    classifier = classifier if classifier is not None else load_classifier(CLASSIFIER_PATH)
    with torch.no_grad():
        uncond = encode_prompts(pipe, [""])
        results = []
        for prompt in (GENERIC_PROMPT, digit_prompt(3)):
            embeds, pooled = encode_prompts(pipe, [prompt])
            gen = torch.Generator().manual_seed(seed)
            x = euler_sample(
                pipe.transformer,
                pipe.scheduler,
                embeds.expand(n, -1, -1),
                pooled.expand(n, -1),
                gen,
                guidance_scale=guidance_scale,
                uncond=uncond,
            )
            results.append(classify(x, classifier))
    histogram = torch.bincount(results[0], minlength=10).tolist()
    return PromptEvaluation(guidance_scale, histogram, (results[1] == 3).float().mean().item())


def evaluate_with_pipeline(pipe, n: int = 256, seed: int = 0, classifier=None) -> PromptEvaluation:
    """The same figures at CFG 1 by diffusers' own ``StableDiffusion3Pipeline.__call__`` (``output_type="latent"``).

    Without a VAE the pipeline takes its latent grid as height // 8, so 8×8 pixels are asked for as height 64.
    """
    classifier = classifier if classifier is not None else load_classifier(CLASSIFIER_PATH)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for prompt in (GENERIC_PROMPT, digit_prompt(3)):
        out = pipe(
            prompt=[prompt] * n,
            height=IMAGE_SIZE * pipe.vae_scale_factor,
            width=IMAGE_SIZE * pipe.vae_scale_factor,
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            max_sequence_length=pipe.tokenizer.model_max_length,
        )
        results.append(classify(out.images.float(), classifier))
    histogram = torch.bincount(results[0], minlength=10).tolist()
    return PromptEvaluation(1.0, histogram, (results[1] == 3).float().mean().item())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded flow-matching digits model (SD3 layout).")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for digits_flow/")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patch-size", type=int, default=2, choices=[1, 2])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--noise-levels", default="logit_normal", choices=["uniform", "logit_normal"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=256, help="0 skips the evaluation")
    args = parser.parse_args(argv)

    result = train_flow(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        patch_size=args.patch_size,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        head_dim=args.head_dim,
        noise_levels=args.noise_levels,
        seed=args.seed,
    )
    out_dir = args.out / DIGITS_FLOW_MODEL_DIR.name
    save_flow_model(result.pipe, out_dir)
    print(
        f"saved to {out_dir}: {result.parameters / 1e6:.3f} M parameters, {folder_bytes(out_dir) / 1e6:.2f} MB; "
        f"loss {result.loss:.4f} after {args.steps} steps, {result.seconds:.0f} s on "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    if args.eval_samples > 0:
        pipe = load_pipeline(out_dir)  # what was saved, read back
        classifier = load_classifier(CLASSIFIER_PATH)
        n = args.eval_samples
        for g in (1.0, 2.0):
            ev = evaluate(pipe, n, guidance_scale=g, seed=args.seed, classifier=classifier)
            print(f"Euler ODE, CFG {g:g}: generic-prompt classes {ev.histogram}; '… 3' → 3: {ev.fraction_three:.3f}")
        ev = evaluate_with_pipeline(pipe, n, seed=args.seed, classifier=classifier)
        print(f"StableDiffusion3Pipeline, CFG 1: generic classes {ev.histogram}; '… 3' → 3: {ev.fraction_three:.3f}")


if __name__ == "__main__":
    main()
