"""A scalar residual flow F̃_φ(x_t, t, c) ∈ (0, 1) fitted to its definition, whose gradient is the flow score
(docs/why-residual-nabla-db-stalled.md).

Residual ∇-DB's residual flow is F̃(x_t) = E_{P_F^#}[R(x_T)^β | x_t] (arXiv 2412.07775, §3.3), a function of the
pretrained sampler and the reward alone. For a reward bounded above by r_max, R^β/R_max^β ∈ (0, 1], and the binary
cross-entropy of σ(logit_φ(x_t, t)) against the soft label y = exp(β·(r(x_T) − r_max)) of the trajectory's final
sample is minimised by σ(logit) = E_#[y | x_t] = F̃(x_t)/R_max^β: a regression on pretrained trajectories that needs
no bootstrapping and does not move with the policy being trained. The flow score the ∇-DB conditions use is then
∇_x log F̃_φ(x) = ∇_x log σ(logit_φ(x, t)) (the constant R_max^β drops out).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int = 32) -> Tensor:
    """Sinusoidal embedding of DDPM timesteps (negative ones, after the last step, are clamped to 0). (N, dim)."""
    frequencies = torch.exp(-math.log(1000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float().clamp(min=0)[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ValueFlowHead(nn.Module):
    """logit_φ(x, t, c): a small CNN (timestep and mean-pooled prompt embedding as per-layer shifts, stride-2 levels
    down to ≤ 4×4, then an MLP on the flattened map: the spatial layout is kept, a digit's class depends on it). Its
    last layer is zero-initialised: F̃_φ = ½ everywhere, flow score 0,
    so training starts at the pretrained sampler. Called like the score flow head, it returns the flow score."""

    def __init__(self, channels: int, sample_size: int, cross_attention_dim: int, width: int = 64):
        super().__init__()
        levels = max(1, math.ceil(math.log2(max(sample_size, 4) / 4)))  # stride-2 convs down to ≤ 4×4
        self.convs = nn.ModuleList(
            [nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)]
            + [nn.Conv2d(width, width, 3, padding=1, stride=2) for _ in range(levels)]
        )
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, len(self.convs) * width))
        self.prompt = nn.Linear(cross_attention_dim, len(self.convs) * width)
        final = math.ceil(sample_size / 2**levels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * final**2, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def logit(self, x: Tensor, t: Tensor, prompt_embeds: Tensor) -> Tensor:
        """(N,) logits of F̃_φ / R_max^β."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            conditioning = self.time(timestep_embedding(t.to(x.device))) + self.prompt(prompt_embeds.float().mean(1))
            shifts = conditioning.chunk(len(self.convs), dim=1)
            h = x.float()
            for conv, shift in zip(self.convs, shifts, strict=True):
                h = nn.functional.silu(conv(h) + shift[:, :, None, None])
            return self.head(h).squeeze(1)

    def forward(self, x: Tensor, t: Tensor, prompt_embeds: Tensor) -> Tensor:
        """The flow score ∇_x log σ(logit_φ(x, t, c)), shaped like x; a constant (the head is fitted by
        :func:`value_fit_loss`, not through the ∇-DB residuals)."""
        with torch.enable_grad():
            leaf = x.detach().float().requires_grad_(True)
            log_flow = nn.functional.logsigmoid(self.logit(leaf, t, prompt_embeds))
            (score,) = torch.autograd.grad(log_flow.sum(), leaf)
        return score.detach().to(x.dtype)


def value_fit_loss(head: ValueFlowHead, states: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                   labels: Tensor) -> Tensor:  # fmt: skip
    """Mean binary cross-entropy of σ(logit_φ(x_t, t)) against soft labels y ∈ [0, 1]; minimised by E[y | x_t]."""
    return nn.functional.binary_cross_entropy_with_logits(head.logit(states, timesteps, prompt_embeds), labels)


def soft_labels(log_rewards: Tensor, reward_scale: float, reward_max: float) -> Tensor:
    """y = exp(β·(r − r_max)) ∈ (0, 1]."""
    return torch.exp(reward_scale * (log_rewards.float() - reward_max)).clamp(0, 1)
