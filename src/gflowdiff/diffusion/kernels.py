"""Transition kernels: one sampler step x → x' as the Gaussian P_F(x'|x) = N(μ, σ²I) the objectives need, with its
fixed backward policy P_B(x|x'), for DDPM-style and rectified-flow models (docs/method.md §1 and §10).

A kernel is the sampler's math only: it holds no model and no state. The caller runs the network and passes its
output. Every method takes per-sample "step times" as (B,) tensors, ``time`` for the state x and ``time_next`` for
x' (the cleaner one):

============== ======================= ===================== ==============================================
kernel         ``time``, ``time_next`` model ``output``      the step
============== ======================= ===================== ==============================================
DDPMKernel     ᾱ_t, ᾱ_{t−Δ}            ε̂ (CFG-combined)      DDIM-η mean and std (``math``)
FlowSDEKernel  s, s_next (s_next < s)  velocity v ≈ ε − x0   Euler–Maruyama step of the flow SDE (``flow_math``)
EulerODE       s, s_next               velocity v            Euler step of the ODE; deterministic, no density
DDIMODE        ᾱ_t, ᾱ_{t−Δ}            ε̂ (CFG-combined)      DDIM η = 0; deterministic, no density
============== ======================= ===================== ==============================================

One step: ``mean = kernel.mean(x, output, time, time_next)``, ``std = kernel.std(time, time_next)``,
``x_next = kernel.sample(mean, std, noise)``, then ``kernel.log_prob(x_next, mean, std)`` and the scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from gflowdiff.diffusion import flow_math, math


def flow_signal(s: Tensor) -> Tensor:
    """ᾱ of a rectified-flow state: x_s = (1−s)·x0 + s·ε is √ᾱ·x0 + √(1−ᾱ)·ε scaled by √((1−s)² + s²), so
    ᾱ = (1−s)² / ((1−s)² + s²) (1 at the data, 0 at the noise)."""
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


class NoTransitionDensityError(ValueError):
    """A density (log-prob or score) was asked of a deterministic kernel."""


class TransitionKernel(ABC):
    """The Gaussian step P_F(x'|x) = N(mean, std²·I) and the fixed backward policy P_B(x|x') of one sampler.

    ``stochastic`` is False for a kernel without a transition density; its density methods raise
    :class:`NoTransitionDensityError`. The objectives (and anything computing log P_F) need ``stochastic``.
    """

    stochastic: bool = True

    @abstractmethod
    def signal(self, time: Tensor) -> Tensor:
        """The state's signal fraction ᾱ at ``time`` (x = √ᾱ·x0 + √(1−ᾱ)·ε up to a scale): the axis the
        forward-looking guess is weighted on (docs/method.md §2.4), the same for every model family."""

    @abstractmethod
    def x0(self, x: Tensor, output: Tensor, time: Tensor) -> Tensor:
        """The model's one-step guess of the clean sample, x̂0, from the state x at ``time``."""

    @abstractmethod
    def mean(self, x: Tensor, output: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        """μ(x), the mean of x'; a differentiable function of x (and of ``output``) for :meth:`reverse_score`."""

    @abstractmethod
    def std(self, time: Tensor, time_next: Tensor) -> Tensor:
        """σ, the step's standard deviation, (B,); it does not depend on x or the model."""

    @abstractmethod
    def backward_scores(self, x: Tensor, x_next: Tensor, time: Tensor, time_next: Tensor) -> tuple[Tensor, Tensor]:
        """(∇_{x'} log P_B(x|x'), ∇_x log P_B(x|x')), the P_B terms of the ∇-DB conditions (docs/method.md §2.2)."""

    @abstractmethod
    def backward_sample(self, x_next: Tensor, noise: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        """A draw x ~ P_B(x|x') for a standard-normal ``noise``: x' noised back to ``time`` (DRaFT-LV)."""

    def sample(self, mean: Tensor, std: Tensor, noise: Tensor) -> Tensor:
        """x' = μ + σ·z for a standard-normal ``noise`` z."""
        return mean + math.per_sample(std, mean) * noise

    def log_prob(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log P_F(x'|x), summed over the non-batch dims → (B,) (``math.gaussian_log_prob``)."""
        return math.gaussian_log_prob(x_next, mean, std)

    def forward_score(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """∇_{x'} log P_F(x'|x) = −(x' − μ)/σ² (``math.forward_score``)."""
        return math.forward_score(x_next, mean, std)

    def reverse_score(self, x: Tensor, x_next: Tensor, mean: Tensor, std: Tensor, create_graph: bool = False) -> Tensor:
        """∇_x log P_F(x'|x) by autograd through ``mean``, which must be a function of x (``math.reverse_score``)."""
        return math.reverse_score(x, x_next, mean, std, create_graph=create_graph)


class DDPMKernel(TransitionKernel):
    """DDIM-η steps of an ε-prediction model (docs/method.md §1): exactly today's ``math`` functions, so a caller
    switching to this kernel computes the same numbers. ``time`` = ᾱ_t, ``time_next`` = ᾱ_{t−Δ}; ``output`` = ε̂
    (convert other prediction types with ``math.epsilon_from_model_output`` first).

    Args:
        eta: DDIM η; 1 gives the DDPM posterior variance. Must be > 0 (η = 0 is deterministic: no density).
    """

    def __init__(self, eta: float = 1.0) -> None:
        if eta <= 0:
            raise ValueError("DDPMKernel eta must be > 0 (a deterministic sampler has no transition density)")
        self.eta = eta

    def __repr__(self) -> str:
        return f"DDPMKernel(eta={self.eta})"

    def signal(self, time: Tensor) -> Tensor:
        return time  # ᾱ itself

    def x0(self, x: Tensor, output: Tensor, time: Tensor) -> Tensor:
        return math.predicted_x0(x, output, time)

    def mean(self, x: Tensor, output: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        return math.ddim_mean(x, output, time, time_next, self.std(time, time_next))

    def std(self, time: Tensor, time_next: Tensor) -> Tensor:
        return math.ddim_std(time, time_next, self.eta)

    def backward_scores(self, x: Tensor, x_next: Tensor, time: Tensor, time_next: Tensor) -> tuple[Tensor, Tensor]:
        return math.backward_kernel_scores(x, x_next, time, time_next)

    def backward_sample(self, x_next: Tensor, noise: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        return math.backward_kernel_sample(x_next, time, time_next, noise)


class DeterministicKernel(TransitionKernel):
    """A sampler step without a transition density (σ = 0): its log-prob and scores raise
    :class:`NoTransitionDensityError`, naming the kernel and the option that selects it. P_B's draw stays."""

    stochastic = False

    def log_prob(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        raise _no_density(type(self).__name__, "log_prob")

    def forward_score(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        raise _no_density(type(self).__name__, "forward_score")

    def reverse_score(self, x: Tensor, x_next: Tensor, mean: Tensor, std: Tensor, create_graph: bool = False) -> Tensor:
        raise _no_density(type(self).__name__, "reverse_score")

    def backward_scores(self, x: Tensor, x_next: Tensor, time: Tensor, time_next: Tensor) -> tuple[Tensor, Tensor]:
        raise _no_density(type(self).__name__, "backward_scores")


class DDIMODE(DeterministicKernel, DDPMKernel):
    """Deterministic DDIM (η = 0): the same mean as :class:`DDPMKernel` with σ = 0, x' = μ(x). It has no transition
    density, so only the objectives that backpropagate the reward through the sampler (ReFL, DRaFT) and evaluation
    run on it; every log-prob or score raises :class:`NoTransitionDensityError`. P_B stays the DDPM noising kernel."""

    def __init__(self) -> None:
        self.eta = 0.0

    def __repr__(self) -> str:
        return "DDIMODE()"


class FlowSDEKernel(TransitionKernel):
    """Euler–Maruyama steps of the SDE with the rectified-flow ODE's marginals (docs/method.md §10,
    ``flow_math.flow_sde_mean``). ``time`` = s, ``time_next`` = s_next with 0 ≤ s_next < s ≤ 1 (checked: anything
    else raises); ``output`` = the velocity v. Every step is stochastic, the first (s = 1) and the last
    (s_next = 0) included, so every transition of a rollout has a density. Computed in at least fp32; log-probs and
    scores upcast a bf16 x' before comparing it with the fp32 mean.

    P_B is the Gaussian noising kernel of the rectified-flow marginals (``flow_math.flow_noising_kernel``).

    Args:
        noise_level: a in σ_s = a·√(s/(1 − s)); must be > 0 (a = 0 is the ODE: use ``EulerODE``).
    """

    def __init__(self, noise_level: float = 0.7) -> None:
        if noise_level <= 0:
            raise ValueError(
                "FlowSDEKernel noise_level must be > 0 (noise_level 0 is the deterministic ODE, EulerODE, which has "
                "no transition density)"
            )
        self.noise_level = noise_level

    def __repr__(self) -> str:
        return f"FlowSDEKernel(noise_level={self.noise_level})"

    def signal(self, time: Tensor) -> Tensor:
        return flow_signal(time)

    def x0(self, x: Tensor, output: Tensor, time: Tensor) -> Tensor:
        return flow_math.flow_x0(x, output, time)

    def mean(self, x: Tensor, output: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        flow_math.check_flow_step_times(time, time_next)
        return flow_math.flow_sde_mean(x, output, time, time_next, self.noise_level)

    def std(self, time: Tensor, time_next: Tensor) -> Tensor:
        flow_math.check_flow_step_times(time, time_next)
        return flow_math.flow_sde_std(time, time_next, self.noise_level)

    def ode_step(self, x: Tensor, output: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        """The deterministic Euler step of the same model: x + v·(s_next − s)."""
        return flow_math.euler_ode_step(x, output, time, time_next)

    def backward_scores(self, x: Tensor, x_next: Tensor, time: Tensor, time_next: Tensor) -> tuple[Tensor, Tensor]:
        return flow_math.flow_backward_kernel_scores(x, x_next, time, time_next)

    def backward_sample(self, x_next: Tensor, noise: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        return flow_math.flow_backward_kernel_sample(x_next, time, time_next, noise)

    def log_prob(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return super().log_prob(_upcast(x_next), mean, std)

    def forward_score(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return super().forward_score(_upcast(x_next), mean, std)

    def reverse_score(self, x: Tensor, x_next: Tensor, mean: Tensor, std: Tensor, create_graph: bool = False) -> Tensor:
        return super().reverse_score(x, _upcast(x_next), mean, std, create_graph=create_graph)


class EulerODE(DeterministicKernel):
    """The deterministic Euler sampler of a rectified-flow model, x' = x + v·(s_next − s) (diffusers'
    ``FlowMatchEulerDiscreteScheduler``), the reference for the SDE's marginals. It has
    no transition density: ``std`` is 0 and every log-prob or score raises :class:`NoTransitionDensityError`.
    ``time`` = s, ``time_next`` = s_next; ``output`` = the velocity v.
    """

    def __repr__(self) -> str:
        return "EulerODE()"

    def signal(self, time: Tensor) -> Tensor:
        return flow_signal(time)

    def x0(self, x: Tensor, output: Tensor, time: Tensor) -> Tensor:
        return flow_math.flow_x0(x, output, time)

    def mean(self, x: Tensor, output: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        return flow_math.euler_ode_step(x, output, time, time_next)

    def std(self, time: Tensor, time_next: Tensor) -> Tensor:
        return torch.zeros_like(time, dtype=torch.promote_types(time.dtype, torch.float32))

    def backward_sample(self, x_next: Tensor, noise: Tensor, time: Tensor, time_next: Tensor) -> Tensor:
        """The rectified-flow noising kernel: P_B is a property of the marginals, not of the sampler."""
        return flow_math.flow_backward_kernel_sample(x_next, time, time_next, noise)


def _no_density(kernel: str, method: str) -> NoTransitionDensityError:
    return NoTransitionDensityError(
        f"{kernel}.{method}: this sampler is deterministic (--model.sampler.eta 0) and has no transition density. "
        "The GFlowNet objectives (and anything that needs log P_F or its scores, such as DDPO) need a stochastic "
        "kernel: --model.sampler.eta > 0."
    )


def _upcast(x: Tensor) -> Tensor:
    return x.to(flow_math.compute_dtype(x))


@dataclass(frozen=True)
class TransitionStep:
    """One sampler step of a batch of transitions x → x': the kernel, its per-sample step times (for
    :class:`DDPMKernel` ᾱ_t and ᾱ_{t−Δ}) and σ, computed once. The objectives pass this one bundle around instead of
    (σ, ᾱ_t, ᾱ_prev) in varying orders."""

    kernel: TransitionKernel
    time: Tensor  # (B,) of the state x
    time_next: Tensor  # (B,) of x'
    std: Tensor  # (B,)

    @classmethod
    def of(cls, kernel: TransitionKernel, time: Tensor, time_next: Tensor) -> TransitionStep:
        return cls(kernel, time, time_next, kernel.std(time, time_next))

    def mean(self, x: Tensor, output: Tensor) -> Tensor:
        """μ(x) of P_F(x'|x) from the model's output at x."""
        return self.kernel.mean(x, output, self.time, self.time_next)

    @property
    def signal(self) -> Tensor:
        """ᾱ (or its flow-model equivalent, :func:`flow_signal`) of the state x."""
        return self.kernel.signal(self.time)

    @property
    def signal_next(self) -> Tensor:
        """ᾱ (or its flow-model equivalent) of x'."""
        return self.kernel.signal(self.time_next)

    def x0(self, x: Tensor, output: Tensor) -> Tensor:
        """x̂0 from the state x and the model's output there."""
        return self.kernel.x0(x, output, self.time)

    def x0_next(self, x_next: Tensor, output: Tensor, rows: Tensor | None = None) -> Tensor:
        """x̂0 from x' (at ``time_next``) and the model's output there; ``rows``: x' holds only these rows."""
        return self.kernel.x0(x_next, output, self.time_next if rows is None else self.time_next[rows])

    def sample(self, mean: Tensor, noise: Tensor) -> Tensor:
        """x' = μ + σ·z for a standard-normal ``noise`` z."""
        return self.kernel.sample(mean, self.std, noise)

    def log_prob(self, x_next: Tensor, mean: Tensor) -> Tensor:
        return self.kernel.log_prob(x_next, mean, self.std)

    def forward_score(self, x_next: Tensor, mean: Tensor) -> Tensor:
        return self.kernel.forward_score(x_next, mean, self.std)

    def reverse_score(self, x: Tensor, x_next: Tensor, mean: Tensor) -> Tensor:
        return self.kernel.reverse_score(x, x_next, mean, self.std)

    def backward_scores(self, x: Tensor, x_next: Tensor) -> tuple[Tensor, Tensor]:
        return self.kernel.backward_scores(x, x_next, self.time, self.time_next)

    def backward_sample(self, x_next: Tensor, noise: Tensor) -> Tensor:
        """x ~ P_B(x|x'): x' noised back to the step's ``time``."""
        return self.kernel.backward_sample(x_next, noise, self.time, self.time_next)
