"""The embedded flow-matching digits model: SD3 layout, SD3's conditioning rule, prompts followed, re-trainable."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gflowdiff.diffusion.policy import resolve_pretrained_path
from gflowdiff.zoo import digits_flow
from gflowdiff.zoo.digits import MAX_PROMPT_TOKENS

FOLDER = digits_flow.DIGITS_FLOW_MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    return digits_flow.load_pipeline(FOLDER)


def test_shipped_folder_is_an_sd3_layout_that_loads_component_by_component():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    assert resolve_pretrained_path("embedded:digits_flow") == str(FOLDER)
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["vae"] == index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    transformer = SD3Transformer2DModel.from_pretrained(FOLDER, subfolder="transformer")
    assert transformer.config.in_channels == transformer.config.out_channels == 1
    assert transformer.config.sample_size == 8
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(FOLDER, subfolder="scheduler")
    assert scheduler.config.shift == 1.0 and not scheduler.config.use_dynamic_shifting
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = CLIPTextModelWithProjection.from_pretrained(FOLDER, subfolder=name)
        widths.append((encoder.config.hidden_size, encoder.config.projection_dim))
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = AutoTokenizer.from_pretrained(FOLDER, subfolder=name)
        assert tokenizer.model_max_length == MAX_PROMPT_TOKENS
    # Concatenated CLIP widths fit the joint attention width (zero-padded up to it); projections make the pooled vector.
    assert sum(h for h, _ in widths) <= transformer.config.joint_attention_dim
    assert sum(p for _, p in widths) == transformer.config.pooled_projection_dim


def test_conditioning_is_encode_prompts_rule_without_t5(pipe):
    prompts = ["a handwritten digit 3", "a handwritten digit", ""]
    embeds, pooled = digits_flow.encode_prompts(pipe, prompts)
    outs = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt").input_ids  # (3, 8)
        outs.append(encoder(ids, output_hidden_states=True))
    clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)  # (3, 8, 32 + 48): penultimate layers
    joint = pipe.transformer.config.joint_attention_dim
    expected = torch.cat([F.pad(clip, (0, joint - clip.shape[-1])), torch.zeros(3, 8, joint)], dim=1)  # T5 → zeros
    assert embeds.shape == (3, 16, joint)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, torch.cat([o.text_embeds for o in outs], dim=-1), rtol=0, atol=0)


def test_euler_sampler_is_the_sd3_pipelines_sampler(pipe):
    """Same latents and prompt: our 3-step Euler ODE with CFG 2 equals StableDiffusion3Pipeline.__call__'s output."""
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = digits_flow.euler_sample(
        pipe.transformer,
        pipe.scheduler,
        *digits_flow.encode_prompts(pipe, ["a handwritten digit 7"] * 4),
        torch.Generator(),
        steps=3,
        guidance_scale=2.0,
        uncond=digits_flow.encode_prompts(pipe, [""]),
        latents=latents,
    )
    theirs = pipe(
        prompt=["a handwritten digit 7"] * 4,
        height=64,  # latent grid = height // vae_scale_factor (8 without a VAE)
        width=64,
        num_inference_steps=3,
        guidance_scale=2.0,
        latents=latents,
        output_type="latent",
        max_sequence_length=MAX_PROMPT_TOKENS,
    ).images
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_shipped_model_follows_prompts(pipe):
    """64 samples, 20 Euler steps, CFG 1. Measured: "… 3" → 3 in 61 of these 64 (97.3 % of 256); the generic prompt
    covers all 10 classes here (4 to 8 each) and on 256 (20 to 31 each). The thresholds leave room for a re-training."""
    ev = digits_flow.evaluate(pipe, n=64, guidance_scale=1.0, seed=0)
    assert ev.fraction_three >= 0.8
    assert sum(count > 0 for count in ev.histogram) >= 8


def test_training_command_writes_a_folder_that_loads_back(tmp_path):
    digits_flow.main(
        ["--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--layers", "1", "--eval-samples", "0"]
    )
    pipe = digits_flow.load_pipeline(tmp_path / "digits_flow")
    embeds, pooled = digits_flow.encode_prompts(pipe, ["a handwritten digit 1"] * 2)
    x = digits_flow.euler_sample(pipe.transformer, pipe.scheduler, embeds, pooled, torch.Generator(), steps=2)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
