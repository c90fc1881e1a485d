"""The tiny SDXL and SD3 pipelines: built offline in their families' diffusers layouts, they load with the family's
own pipeline class and give an image in two steps."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.parametrize(
    ("fixture", "pipeline_name", "denoiser", "scheduler"),
    [
        ("tiny_sdxl_path", "StableDiffusionXLPipeline", "unet", "EulerDiscreteScheduler"),
        ("tiny_sd3_path", "StableDiffusion3Pipeline", "transformer", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_the_family_pipeline_loads_the_folder_and_makes_an_image(request, fixture, pipeline_name, denoiser, scheduler):
    import diffusers

    path = request.getfixturevalue(fixture)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_name
    named = {name for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None}
    assert named == {p.name for p in path.iterdir() if p.is_dir()}  # every named component saved, nothing else

    pipe = getattr(diffusers, pipeline_name).from_pretrained(path)
    assert type(getattr(pipe, denoiser)).__name__ == index[denoiser][1]
    assert type(pipe.scheduler).__name__ == scheduler
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red cube", num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="pt").images
    side = getattr(pipe, denoiser).config.sample_size * pipe.vae_scale_factor  # 8 latents × 2 = 16 pixels
    assert image.shape == (1, 3, side, side)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1 and image.std() > 0


def test_sdxl_unet_reads_the_text_time_conditioning(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # 6 time ids × 4 + the pooled projection 16 = 40, the added embedding's input (pipeline._get_add_time_ids checks it)
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * 4 + pipe.text_encoder_2.config.projection_dim


def test_sd3_has_t5_and_the_sd3_latent_conventions(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    ids = pipe.tokenizer_3("a cat", padding="max_length", max_length=8, return_tensors="pt").input_ids
    # character-level: "▁" a "▁" c a t, then </s> and <pad> (ids 1 and 0, as T5's)
    assert ids[0, :7].tolist() == pipe.tokenizer_3.convert_tokens_to_ids(["▁", "a", "▁", "c", "a", "t", "</s>"])
    assert ids[0, 7] == pipe.tokenizer_3.pad_token_id == 0
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
