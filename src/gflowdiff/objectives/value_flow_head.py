"""A scalar residual flow F̃_φ(x_t, t, c) ∈ (0, 1) fitted to its definition, whose gradient is the flow score
(docs/why-residual-nabla-db-stalled.md).

Residual ∇-DB's residual flow is F̃(x_t) = E_{P_F^#}[R(x_T)^β | x_t] (arXiv 2412.07775, §3.3), a function of the
pretrained sampler and the reward alone. For a reward bounded above by r_max, R^β/R_max^β ∈ (0, 1], and the binary
cross-entropy of σ(logit_φ(x_t, t)) against the soft label y = exp(β·(r(x_T) − r_max)) of the trajectory's final
sample is minimised by σ(logit) = E_#[y | x_t] = F̃(x_t)/R_max^β: a regression on pretrained trajectories that needs
no bootstrapping and does not move with the policy being trained. The flow score the ∇-DB conditions use is then
∇_x log F̃_φ(x) = ∇_x log σ(logit_φ(x, t)) (the constant R_max^β drops out).

The head may also read the pretrained model's own guess of the clean sample, x̂0_#(x_t, t) (``denoised_input``): a
deterministic function of x_t, so the minimiser is the same F̃(x_t), but one in which a digit's class is already
visible at the high-noise steps that decide it. Its flow score then includes the pretrained denoiser's Jacobian,
∇_x log σ(logit_φ(x, x̂0_#(x), t)), one vector-Jacobian product of the frozen model per evaluation. Measured on the
digits: a better fit and better guidance, but not a better trained policy (docs/why-residual-nabla-db-stalled.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: x ↦ x̂0_#(x): the pretrained model's clean-sample guess at the head's states, differentiable in x
Denoiser = Callable[[Tensor], Tensor]


def timestep_embedding(t: Tensor, dim: int = 32) -> Tensor:
    """Sinusoidal embedding of DDPM timesteps (negative ones, after the last step, are clamped to 0). (N, dim)."""
    frequencies = torch.exp(-math.log(1000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float().clamp(min=0)[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ValueFlowHead(nn.Module):
    """logit_φ(x, t, c): a small CNN (timestep and mean-pooled prompt embedding as per-layer shifts, stride-2 levels
    down to ≤ 4×4, then an MLP on the flattened map: the spatial layout is kept, a digit's class depends on it). Its
    last layer is zero-initialised: F̃_φ = ½ everywhere, flow score 0,
    so training starts at the pretrained sampler. Called like the score flow head, it returns the flow score.

    With ``denoised_input`` the CNN reads [x, x̂0_#(x)] stacked on the channel axis; every call then passes the
    pretrained denoiser (``denoised`` to :meth:`logit`, ``denoise`` to :meth:`forward`)."""

    def __init__(
        self, channels: int, sample_size: int, cross_attention_dim: int, width: int = 64, denoised_input: bool = False
    ):
        super().__init__()
        self.denoised_input = denoised_input
        levels = max(1, math.ceil(math.log2(max(sample_size, 4) / 4)))  # stride-2 convs down to ≤ 4×4
        inputs = 2 * channels if denoised_input else channels
        self.convs = nn.ModuleList(
            [nn.Conv2d(inputs, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)]
            + [nn.Conv2d(width, width, 3, padding=1, stride=2) for _ in range(levels)]
        )
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, len(self.convs) * width))
        self.prompt = nn.Linear(cross_attention_dim, len(self.convs) * width)
        final = math.ceil(sample_size / 2**levels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * final**2, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def logit(self, x: Tensor, t: Tensor, prompt_embeds: Tensor, denoised: Tensor | None = None) -> Tensor:
        """(N,) logits of F̃_φ / R_max^β; ``denoised``: x̂0_#(x, t), required with ``denoised_input``."""
        if self.denoised_input and denoised is None:
            raise ValueError("this value head reads the pretrained model's x̂0 (denoised_input): pass it")
        with torch.autocast(device_type=x.device.type, enabled=False):
            conditioning = self.time(timestep_embedding(t.to(x.device))) + self.prompt(prompt_embeds.float().mean(1))
            shifts = conditioning.chunk(len(self.convs), dim=1)
            h = torch.cat([x.float(), denoised.float()], 1) if self.denoised_input else x.float()
            for conv, shift in zip(self.convs, shifts, strict=True):
                h = nn.functional.silu(conv(h) + shift[:, :, None, None])
            return self.head(h).squeeze(1)

    def forward(self, x: Tensor, t: Tensor, prompt_embeds: Tensor, denoise: Denoiser | None = None) -> Tensor:
        """The flow score ∇_x log σ(logit_φ(x, t, c)), shaped like x; a constant (the head is fitted by
        :func:`value_fit_loss`, not through the ∇-DB residuals). With ``denoised_input``, ``denoise`` maps x to
        x̂0_#(x) and the gradient runs through it."""
        if self.denoised_input and denoise is None:
            raise ValueError("this value head reads the pretrained model's x̂0 (denoised_input): pass denoise")
        with torch.enable_grad():
            leaf = x.detach().float().requires_grad_(True)
            denoised = denoise(leaf) if self.denoised_input else None
            log_flow = nn.functional.logsigmoid(self.logit(leaf, t, prompt_embeds, denoised))
            (score,) = torch.autograd.grad(log_flow.sum(), leaf)
        return score.detach().to(x.dtype)


def value_fit_loss(head: ValueFlowHead, states: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                   labels: Tensor, denoised: Tensor | None = None) -> Tensor:  # fmt: skip
    """Mean binary cross-entropy of σ(logit_φ(x_t, t)) against soft labels y ∈ [0, 1]; minimised by E[y | x_t]."""
    logits = head.logit(states, timesteps, prompt_embeds, denoised)
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def soft_labels(log_rewards: Tensor, reward_scale: float, reward_max: float) -> Tensor:
    """y = exp(β·(r − r_max)) ∈ (0, 1]."""
    return torch.exp(reward_scale * (log_rewards.float() - reward_max)).clamp(0, 1)
