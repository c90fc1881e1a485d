"""The scheduler's ``prediction_type`` (issue 18 item 9): gflowdiff reads the UNet's output as ε, v or x̂0 and its
one-step DDIM η = 1 transition equals diffusers' ``DDIMScheduler.step`` for each; other types are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gflowdiff.diffusion.math import ddim_mean, ddim_std, per_sample, predicted_x0, previous_timesteps
from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.zoo.tiny_sd import sd_scheduler

NUM_INFERENCE_STEPS = 4


def with_prediction_type(tiny_sd_path: Path, root: Path, prediction_type: str) -> Path:
    """The tiny SD folder whose scheduler config says ``prediction_type`` (the other parts linked, not copied)."""
    model = root / f"model_{prediction_type}"
    model.mkdir()
    for part in tiny_sd_path.iterdir():
        if part.name != "scheduler":
            (model / part.name).symlink_to(part)
    scheduler = sd_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    scheduler.save_config(model / "scheduler")
    return model


def diffusers_step(policy: DiffusionPolicy, output, t: int, x, noise):
    """diffusers' DDIM η = 1 step on the raw (guided) UNet output: (prev_sample, pred_original_sample)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(policy.scheduler.config)
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    step = scheduler.step(output, t, x, eta=1.0, variance_noise=noise)
    return step.prev_sample, step.pred_original_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_one_step_matches_diffusers_ddim_step(tiny_sd_path, tmp_path, prediction_type, guidance_scale):
    policy = DiffusionPolicy(str(with_prediction_type(tiny_sd_path, tmp_path, prediction_type)))
    assert policy.prediction_type == prediction_type
    with torch.no_grad():
        for parameter in policy.lora_parameters():
            parameter.normal_(0, 0.05)  # a fine-tuned policy, not the pretrained one
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    cond, uncond = policy.encode_prompts(["a cat", "a dog"]), policy.encode_prompts(["", ""])
    timesteps = policy.inference_timesteps(NUM_INFERENCE_STEPS)
    prev = previous_timesteps(timesteps, policy.num_train_timesteps, NUM_INFERENCE_STEPS)
    for t, t_prev in [(timesteps[0], prev[0]), (timesteps[-2], prev[-2])]:
        t_batch, t_prev_batch = t.repeat(2), t_prev.repeat(2)
        with torch.no_grad():
            output = policy.guided_output(x, t_batch, cond, uncond, guidance_scale)
            eps = policy.kernel_output(x, t_batch, cond, uncond, guidance_scale)
        abar_t, abar_prev = policy.alpha_bar(t_batch), policy.alpha_bar(t_prev_batch)
        std = ddim_std(abar_t, abar_prev)
        ours = ddim_mean(x, eps, abar_t, abar_prev, std) + per_sample(std, x) * noise
        theirs, theirs_x0 = diffusers_step(policy, output, int(t), x, noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(predicted_x0(x, eps, abar_t), theirs_x0, rtol=1e-4, atol=1e-4)


def test_an_unknown_prediction_type_is_refused(tiny_sd_path, tmp_path):
    model = with_prediction_type(tiny_sd_path, tmp_path, "flow")
    with pytest.raises(ValueError, match="--model.pretrained_model .*prediction_type 'flow'"):
        DiffusionPolicy(str(model))
