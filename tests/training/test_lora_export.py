"""The exported LoRA reproduces gflowdiff's fine-tuned UNet in diffusers for any alpha/rank (issue 18 item 8)."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig
from gflowdiff.training.checkpointing import export_lora
from tests.diffusion.test_policy import noise_inputs, perturb_lora


@pytest.mark.parametrize(("rank", "alpha", "targets"), [(4, 32.0, ["to_q", "to_v"]), (8, 2.0, ["to_k", "conv1"])])
def test_load_lora_weights_reproduces_the_policy(tiny_sd_path, tmp_path, rank, alpha, targets):
    from diffusers import StableDiffusionPipeline

    policy = DiffusionPolicy(str(tiny_sd_path), lora=LoRAConfig(rank=rank, alpha=alpha, target_modules=targets))
    perturb_lora(policy, scale=0.05)
    lora_before = {k: v.clone() for k, v in policy.lora_state_dict().items()}
    export_lora(policy, tmp_path / "lora")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, cond, _ = noise_inputs(policy)
    with torch.no_grad():
        expected = policy.unet(x, t, encoder_hidden_states=cond.embeds).sample
        loaded = pipe.unet(x, t, encoder_hidden_states=cond.embeds).sample
        with policy.reference():
            pretrained = policy.unet(x, t, encoder_hidden_states=cond.embeds).sample
    assert (expected - pretrained).abs().max() > 1e-3  # the LoRA matters at this scale
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    after = policy.lora_state_dict()
    assert all(torch.equal(after[k], v) for k, v in lora_before.items())  # exporting left the policy as it was
