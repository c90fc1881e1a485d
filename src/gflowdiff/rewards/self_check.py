"""Start-up self-check of a reward's image gradient: finite, non-zero, and equal to a finite-difference estimate.

Gradient objectives (∇-DB, ReFL, DRaFT) silently train on garbage if a reward's gradient is missing or wrong: a
scorer decorated with ``torch.no_grad`` (as many published scorers are), a ``.detach()`` or a uint8/PIL round trip
in the preprocessing, or a clamp that saturates everything. This check catches those before the first rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gflowdiff.rewards.base import Reward

#: Per-pixel RMS sizes of the finite-difference step, tried in turn: big steps resist fp32 round-off, small
#: steps resist curvature; the check passes if any of them agrees.
STEP_SIZES = (1e-2, 3e-3, 1e-3)
DEFAULT_PROMPT = "a photo of a cat"


class RewardGradientError(RuntimeError):
    """The reward's gradient with respect to the image is missing, non-finite, zero or inconsistent."""


def _device_of(reward: Reward) -> torch.device:
    for tensor in [*reward.parameters(), *reward.buffers()]:
        return tensor.device
    return torch.device("cpu")


def check_reward_gradient(
    reward: Reward,
    image_shape: Sequence[int],
    generator: torch.Generator,
    prompts: Sequence[str] | None = None,
    tolerance: float = 0.15,
) -> None:
    """Raise :class:`RewardGradientError` (naming the reward class) unless ∇_x r(x) is usable.

    On a fixed random image x ∈ [0.2, 0.8] of ``image_shape`` (B, C, H, W): r(x) must be finite, its gradient
    g = ∇_x Σ_b r(x_b) finite and non-zero, and the directional derivative g·v must match the central difference
    (R(x + εv) − R(x − εv)) / 2ε within ``tolerance`` (relative) for at least one step ε. The direction v mixes a
    random direction with ĝ (so that g·v cannot vanish by chance) and is scaled to a per-pixel RMS of 1.

    Args:
        reward: a reward that declares ``differentiable = True``.
        image_shape: (B, C, H, W) of the test image, e.g. the decoder's output shape with a small B.
        generator: CPU generator for the image and the direction (the check is deterministic given its seed).
        prompts: one prompt per image; default: a generic prompt.
        tolerance: largest accepted relative error of the directional derivative.
    """
    name = type(reward).__name__
    if not reward.differentiable:
        raise ValueError(f"{name} declares differentiable = False; its gradient is not meant to be used or checked")
    if len(image_shape) != 4:
        raise ValueError(f"image_shape must be (B, C, H, W), got {tuple(image_shape)}")
    batch = int(image_shape[0])
    prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPT] * batch
    device = _device_of(reward)
    x = (0.2 + 0.6 * torch.rand(tuple(image_shape), generator=generator)).to(device)
    noise = torch.randn(tuple(image_shape), generator=generator).to(device)

    def total(images: Tensor) -> Tensor:
        return reward(images, prompts).double().sum()

    with torch.enable_grad():
        x.requires_grad_(True)
        rewards = reward(x, prompts)
        if not torch.isfinite(rewards).all():
            raise RewardGradientError(f"{name} returned non-finite rewards {rewards.tolist()} on a test image")
        if not rewards.requires_grad:
            raise RewardGradientError(
                f"{name} returned rewards that do not depend on the image in autograd (computed under "
                f"torch.no_grad, detached, or via numpy/PIL?); gradient objectives cannot use it"
            )
        (gradient,) = torch.autograd.grad(rewards.sum(), x, allow_unused=True)
    if gradient is None:
        raise RewardGradientError(f"{name}: the rewards are not connected to the input image in the autograd graph")
    if not torch.isfinite(gradient).all():
        raise RewardGradientError(f"{name}: the gradient with respect to the image has NaN/inf entries")
    gradient_norm = gradient.double().norm()
    if gradient_norm == 0:
        raise RewardGradientError(
            f"{name}: the gradient with respect to the image is exactly zero (a clamp or threshold that saturates, "
            f"or a detached path)"
        )

    # v = (random unit + gradient unit) rescaled to per-pixel RMS 1; the expected g·v is about |g|/√2·√N > 0.
    direction = noise.double() / noise.double().norm() + gradient.double() / gradient_norm
    direction = (direction * (direction.numel() ** 0.5 / direction.norm())).to(x.dtype)
    analytic = float((gradient.double() * direction.double()).sum())
    errors = []
    with torch.no_grad():
        for step in STEP_SIZES:
            upper, lower = total(x.detach() + step * direction), total(x.detach() - step * direction)
            numeric = float((upper - lower) / (2 * step))
            error = abs(numeric - analytic) / max(abs(analytic), abs(numeric), 1e-30)
            if error < tolerance:
                return
            errors.append(f"ε={step:g}: finite difference {numeric:.6g} ({error:.1%} off)")
    raise RewardGradientError(
        f"{name}: the autograd directional derivative {analytic:.6g} disagrees with finite differences "
        f"({'; '.join(errors)}; tolerance {tolerance:.0%}). The reward's gradient is not the gradient of its value "
        f"(a straight-through or surrogate gradient, a detached branch, or non-deterministic outputs?)"
    )
