"""The rollout loop: T steps of the policy's transition kernel (DDIM η = 1, i.e. DDPM, for diffusion models; the
SDE with the ODE's marginals for flow models) with classifier-free guidance, stored for the objectives."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.diffusion.types import Rollout
from gflowdiff.rewards.base import Reward


@dataclass
class SamplerConfig:
    """The sampler that both generates trajectories and defines P_F (docs/method.md §4.1: 50 steps, η = 1, CFG 5).

    Args:
        num_inference_steps: number of sampler steps T.
        guidance_scale: classifier-free guidance weight w (1 = no guidance, a single UNet pass).
        eta: the sampler's noise. Diffusion models: DDIM η, 1 gives the DDPM posterior variance. Flow models: the
            noise level a of the SDE with the ODE's marginals, σ_s = a·√(s/(1−s)) (Flow-GRPO uses 0.7). 0 is the
            deterministic sampler (DDIM η = 0, the Euler ODE): it has no transition density, so only ReFL and DRaFT
            train with it (the others refuse it at start-up).
        merge_lora: fold the LoRA into the base weights while sampling (faster; the weights are restored exactly).
            ``null`` (auto): only with fp32 frozen weights, where the merged sampler equals the unmerged one up to
            fp32 rounding; ``true`` also merges bf16/fp16 weights (measured deviation: docs/performance.md).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    merge_lora: bool | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError("--model.sampler.num_inference_steps must be >= 1")
        if self.eta < 0:
            raise ValueError(f"--model.sampler.eta must be >= 0 (0: the deterministic sampler), got {self.eta}")


def initial_noise(policy: DiffusionPolicy, batch_size: int, generator: torch.Generator) -> Tensor:
    shape = (batch_size, policy.latent_channels, policy.latent_size, policy.latent_size)
    return torch.randn(shape, generator=generator).to(policy.adapter.device)


@torch.no_grad()
def sample_rollout(
    policy: DiffusionPolicy,
    prompts: list[str],
    reward: Reward | None,
    sampler: SamplerConfig,
    generator: torch.Generator,
) -> Rollout:
    """Sample one trajectory per prompt with the current (LoRA-on) policy and score the final samples.

    All randomness comes from ``generator`` (a CPU generator, so runs are reproducible across devices).
    """
    batch_size = len(prompts)
    prompt_embeds = policy.encode_prompts(prompts)
    negative_embeds = policy.unconditional(batch_size)
    device = policy.adapter.device
    timesteps, prev_timesteps = (times.to(device) for times in policy.step_times(sampler.num_inference_steps))

    x = initial_noise(policy, batch_size, generator)
    latents, noise_preds, log_probs = [x], [], []
    merge = policy.should_merge_lora(sampler.merge_lora)
    with policy.merged_lora() if merge else nullcontext():
        for t, t_prev in zip(timesteps, prev_timesteps, strict=True):
            t_batch, t_prev_batch = t.repeat(batch_size), t_prev.repeat(batch_size)
            eps = policy.kernel_output(x, t_batch, prompt_embeds, negative_embeds, sampler.guidance_scale)
            step = policy.transition_step(t_batch, t_prev_batch, sampler.eta)  # DDIM-η, or the flow SDE
            mean = step.mean(x, eps)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = step.sample(mean, noise)
            latents.append(x)
            noise_preds.append(eps)
            if step.kernel.stochastic:
                log_probs.append(step.log_prob(x, mean))

    images = policy.decode(x)
    rewards = reward(images, prompts) if reward is not None else torch.zeros(batch_size, device=x.device)
    return Rollout(
        latents=torch.stack(latents, dim=1),  # (B, T+1, C, H, W)
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        noise_preds=torch.stack(noise_preds, dim=1),  # (B, T, C, H, W)
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,  # (B, T); none for a deterministic sampler
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        prompts=list(prompts),
        images=images,
        rewards=rewards.detach(),
    )
