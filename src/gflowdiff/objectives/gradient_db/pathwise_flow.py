"""Pathwise estimates of the residual flow score ∇_x log F̃(x_t), by backpropagating the terminal reward gradient
through the pretrained sampler's steps along a sampled trajectory (docs/method.md §9).

Notation: a trajectory x_0 → … → x_T of T sampler steps, x_{j+1} = μ_#(x_j) + σ_j·z_j under the pretrained policy
P_F^#. The residual flow of residual ∇-DB is F̃(x_j) = E_{P_F^#}[R(x_T)^β | x_j] (arXiv 2412.07775, §3.3: the flow
that makes P_F = P_F^#·F̃(x')/F̃(x) sample p^#·R^β). Differentiating under the expectation with the noises z held
fixed (the reparameterised pretrained steps, ∂x_{j+1}/∂x_j = J_μ#(x_j)) gives

    ∇_{x_j} log F̃(x_j) = E_target[ a_j | x_j ],   a_T = β·∇_{x_T} r(D(x_T)),   a_j = J_μ#(x_j)ᵀ a_{j+1},

where the expectation is over the target's paths from x_j (the pretrained paths reweighted by R^β / F̃). a_j is the
"lean adjoint" of Adjoint Matching (Domingo-Enrich et al. 2024, arXiv 2409.08861, Eq. 38–39), here for the discrete
Gaussian steps. On trajectories of a policy that samples the target, a_j is therefore an unbiased one-sample
estimate of the flow score at every step, which the detailed-balance conditions only reach one transition per hop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.diffusion.math import ddim_mean, ddim_std, gaussian_log_prob
from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.diffusion.sampling import SamplerConfig
from gflowdiff.diffusion.types import Rollout
from gflowdiff.rewards.base import Reward


def pretrained_step_vjp(
    policy: DiffusionPolicy,
    x: Tensor,
    t: Tensor,
    t_prev: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor,
    sampler: SamplerConfig,
    cotangent: Tensor,
    x_next: Tensor,
) -> tuple[Tensor, Tensor]:
    """(J_μ#(x)ᵀ·cotangent, log P_F^#(x_next | x)): the vector-Jacobian product of one pretrained sampler step's mean
    at x (shape of x) and the pretrained log-density of the stored next state (B,)."""
    with torch.enable_grad(), policy.reference():
        x = x.detach().requires_grad_(True)
        eps = policy.kernel_output(x, t, prompt_embeds, negative_embeds, sampler.guidance_scale)
        abar_t, abar_prev = policy.alpha_bar(t), policy.alpha_bar(t_prev)
        std = ddim_std(abar_t, abar_prev, sampler.eta)
        mean = ddim_mean(x, eps, abar_t, abar_prev, std)
        (gradient,) = torch.autograd.grad(mean, x, cotangent)
    return gradient.detach(), gaussian_log_prob(x_next, mean.detach(), std)


def terminal_reward_gradient(policy: DiffusionPolicy, reward: Reward, x_final: Tensor, prompts: list[str]) -> Tensor:
    """∇_{x_T} r(D(x_T)) of each sample. Shape of x_final."""
    with torch.enable_grad():
        x = x_final.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(reward(policy.decode(x), prompts).sum(), x)
    return gradient.detach()


def pathwise_flow_scores(
    policy: DiffusionPolicy,
    reward: Reward,
    sampler: SamplerConfig,
    rollout: Rollout,
    reward_scale: float,
) -> tuple[Tensor, Tensor]:
    """(a, log P_F^#): a_j for every stored state x_j of the rollout, (B, T+1, C, H, W) with a_T = β·∇r(x_T) (see the
    module docstring), and log P_F^#(x_{j+1} | x_j) of every stored transition, (B, T).

    T vector-Jacobian products through the frozen UNet, one per step, each on the stored states: no graph spans two
    steps, so the memory is that of one pass.
    """
    latents = rollout.latents  # (B, T+1, C, H, W)
    batch, num_steps = rollout.batch_size, rollout.num_steps
    scores = torch.zeros_like(latents)
    log_probs = torch.zeros(batch, num_steps, device=latents.device)
    adjoint = reward_scale * terminal_reward_gradient(policy, reward, latents[:, -1], rollout.prompts)
    scores[:, -1] = adjoint
    for j in range(num_steps - 1, -1, -1):
        t = rollout.timesteps[j].repeat(batch)
        t_prev = rollout.prev_timesteps[j].repeat(batch)
        adjoint, log_probs[:, j] = pretrained_step_vjp(
            policy, latents[:, j], t, t_prev, rollout.prompt_embeds, rollout.negative_embeds, sampler, adjoint,
            latents[:, j + 1],
        )  # fmt: skip
        scores[:, j] = adjoint
    return scores, log_probs


def pathwise_target_weights(log_rewards: Tensor, pretrained_log_probs: Tensor, behaviour_log_probs: Tensor,
                            reward_scale: float) -> Tensor:  # fmt: skip
    """(B, T+1) weights w_j ∝ R(x_T)^β·Π_{k≥j} P_F^#(x_{k+1}|x_k) / P_F^b(x_{k+1}|x_k) of the path from each state x_j
    (w_T ∝ R^β), normalised to mean 1 over the trajectories at each j (P_F^b: the policy that sampled the rollout).

    Why: the exact tilted kernel P*(x'|x) ∝ P_F^#(x'|x)·F̃(x') has the mean shift
    E*[x'] − μ_#(x) = σ²·E_#[∇F̃(x') | x] / E_#[F̃(x') | x] = σ²·E_#[R^β·a_{j+1} | x_j] / E_#[R^β | x_j]
    (Stein's identity for the Gaussian P_F^#, then ∇F̃ = E_#[R^β·a]). Sampled from the behaviour policy instead of
    P_F^#, the same ratio of expectations is recovered with the weights w_j, so the w_j-weighted regression of
    (μ_θ − μ_#)(x_j) onto σ_j²·a_{j+1} has that exact mean shift as its minimiser at every state, whatever policy
    sampled the data; likewise the w_j-weighted regression of a flow score at x_j onto a_j has ∇ log F̃(x_j). At the
    target, Π P_F^#/P_F = F̃(x_j)/R^β and w_j = F̃(x_j): the weights then spread only across states.
    """
    ratio = (pretrained_log_probs - behaviour_log_probs).flip(1).cumsum(1).flip(1)  # Σ_{k≥j} log P#/P_b, (B, T)
    ratio = torch.cat([ratio, torch.zeros_like(ratio[:, :1])], dim=1)  # (B, T+1): the path from x_T is empty
    log_weights = reward_scale * log_rewards.double()[:, None] + ratio.double()
    return (torch.softmax(log_weights, dim=0) * log_weights.shape[0]).float()


def prior_paths(
    policy: DiffusionPolicy,
    reward: Reward,
    sampler: SamplerConfig,
    prompts: list[str],
    reward_scale: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """(latents (B, T+1, C, H, W), a (B, T+1, C, H, W), w (B,)): pretrained trajectories for ``prompts``, their pathwise
    flow scores a_j and weights w ∝ R(x_T)^β (mean 1).

    On pretrained paths the R^β-weighted least-squares fit of a vector field g to a_j is the exact flow score:
    argmin_g E_#[R^β·‖g(x_j) − a_j‖²] = E_#[R^β·a_j | x_j] / E_#[R^β | x_j] = ∇_{x_j} log F̃(x_j), because
    ∇F̃(x_j) = E_#[R^β·a_j | x_j] (the module docstring); unweighted, the fit is E_#[a_j | x_j], which is not.
    """
    from gflowdiff.diffusion.sampling import sample_rollout

    with torch.no_grad(), policy.reference():
        rollout = sample_rollout(policy, prompts, reward, sampler, generator)
    targets, _ = pathwise_flow_scores(policy, reward, sampler, rollout, reward_scale)
    weights = torch.softmax(reward_scale * rollout.rewards.double(), 0) * rollout.batch_size  # R^β / mean R^β
    return rollout.latents, targets, weights.float()
