"""The SD loading path on a tiny random pipeline: LoRA on/off, dtypes, bad input, LoRA export in diffusers format."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig
from gflowdiff.training.checkpointing import LORA_WEIGHT_NAME, export_lora


def perturb_lora(policy: DiffusionPolicy, scale: float = 0.1) -> None:
    """lora_B starts at 0 (Gaussian init), which makes every adapter equal the base model: move it away."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, scale)


def noise_inputs(policy: DiffusionPolicy, batch: int = 2):
    torch.manual_seed(0)
    x = torch.randn(batch, policy.latent_channels, policy.latent_size, policy.latent_size)
    t = torch.tensor([901, 21][:batch])
    cond = policy.encode_prompts(["a cat", "a dog"][:batch])
    uncond = policy.encode_prompts([""] * batch)
    return x, t, cond, uncond


def test_reference_pass_equals_the_base_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    policy = DiffusionPolicy(str(tiny_sd_path))
    x, t, cond, uncond = noise_inputs(policy)
    with torch.no_grad():
        at_init = policy.kernel_output(x, t, cond, uncond, guidance_scale=3.0)
        perturb_lora(policy)
        tuned = policy.kernel_output(x, t, cond, uncond, guidance_scale=3.0)
        with policy.reference():
            reference = policy.kernel_output(x, t, cond, uncond, guidance_scale=3.0)
        base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
        eps_u, eps_c = base(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond.embeds, cond.embeds])
        ).sample.chunk(2)
    expected = eps_u + 3.0 * (eps_c - eps_u)  # CFG: ε_u + w(ε_c − ε_u)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_init, expected, rtol=1e-5, atol=1e-5)  # lora_B = 0 at init
    assert (tuned - expected).abs().max() > 1e-3  # the perturbed adapter changes the output
    assert all(p.requires_grad for p in policy.lora_parameters())  # enable_adapters() restored them


def test_only_lora_is_trainable_and_fp32_with_a_bf16_base(tiny_sd_path):
    policy = DiffusionPolicy(str(tiny_sd_path), lora=LoRAConfig(rank=4, alpha=4), frozen_dtype=torch.bfloat16)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in policy.lora_parameters())
    assert policy.unet.conv_in.weight.dtype == torch.bfloat16
    assert policy.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert policy.text_encoder.dtype == torch.bfloat16


def test_missing_model_folder_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model.pretrained_model"):
        DiffusionPolicy(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        DiffusionPolicy(str(tmp_path))


def test_unreachable_hub_id_names_the_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="--model.pretrained_model"):
        DiffusionPolicy("runwayml/stable-diffusion-v1-5")


def test_unknown_embedded_model_is_rejected():
    with pytest.raises(ValueError, match="unknown embedded model"):
        DiffusionPolicy("embedded:cifar")


def test_exported_lora_loads_with_load_lora_weights(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    policy = DiffusionPolicy(str(tiny_sd_path))
    perturb_lora(policy)
    weights = export_lora(policy, tmp_path / "lora")
    assert weights.name == LORA_WEIGHT_NAME and weights.is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, cond, uncond = noise_inputs(policy, batch=1)
    with torch.no_grad():
        expected = policy.unet(x, t, encoder_hidden_states=cond.embeds).sample
        loaded = pipe.unet(x, t, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
