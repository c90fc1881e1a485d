"""Shared machinery of the scalar detailed-balance baselines DB (DAG, Zhang et al. 2024) and residual DB.

Both enforce, for each transition x → x' (docs/method.md §2.1), the log-domain detailed-balance condition of GFlowNets
(Bengio et al., "GFlowNet Foundations", arXiv 2111.09266), in the continuous diffusion form of DAG (arXiv 2406.00633):

    log F(x) + log P_F(x'|x) = log Prior(x, x') + log F(x'),        log F(x_T) = β·r(x_T)

with a learned scalar log-flow, as the squared residual. Prior is the backward policy P_B(x|x') (DB) or the pretrained
forward policy P_F^#(x'|x) (residual DB: subtracting the pretrained model's own DB condition cancels P_B, and F
becomes the residual flow F/F^#). As in DAG's code, log-probabilities are **means** over the state's elements.

The flow is "forward-looking" (DAG §4): log F(x_t) = F_φ(x_t, t, c) + β·r(D(x̂0_θ(x_t))), with x̂0 from the current
policy under no_grad, so the learned part only corrects a one-step reward estimate.

The scalar F_φ reads out the framework's flow head (``--model.flow_head``) by a global mean over its output field:
a conditional UNet followed by average pooling and the linear map of its (zero-initialised) output layer, the shape of
DAG's scalar flow network (a UNet trunk with a linear scalar head, docs/method.md §2.5). Reusing the module-built
head gives it the policy's dimensions, its own optimizer group (``--model.optimization.flow_head_lr``),
checkpointing, and DDP wrapping without any extra machinery, and F_φ = 0 at step 0.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from torch import Tensor

from gflowdiff.diffusion.math import ddim_mean, ddim_std, gaussian_log_prob, per_sample, predicted_x0
from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives.base import Objective, ObjectiveContext

LogProbReduction = Literal["mean", "sum"]


# ---- pure math ------------------------------------------------------------------------------------------------------
def reduced_gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: LogProbReduction = "mean") -> Tensor:
    """log N(x; μ, σ²I) as the per-element ``mean`` (DAG's ``logp_mean=True``, docs/method.md §2.1) or the ``sum`` over
    the elements (the true log-density).

    Notation: ``x`` → the state whose density is taken, ``mean`` → μ, ``std`` → σ (B,). With ``mean`` the
    detailed-balance optimum is p·R^(β·C·H·W) rather than p·R^β: DAG's convention trades the exact temperature for a
    loss scale independent of the image size.
    """
    log_prob = gaussian_log_prob(x, mean, std)
    return log_prob / x[0].numel() if reduction == "mean" else log_prob


def backward_log_prob(
    x: Tensor, x_next: Tensor, abar_t: Tensor, abar_prev: Tensor, reduction: LogProbReduction = "mean"
) -> Tensor:
    """log P_B(x|x') (per-element mean or sum) for the one-step DDPM noising kernel
    N(√(ᾱ_t/ᾱ_prev)·x', (1 − ᾱ_t/ᾱ_prev)·I).

    Notation: ``x`` → the noisier state at t, ``x_next`` → x' at t − Δ (docs/method.md §1, DAG ``calculate_pb``).
    """
    ratio = abar_t / abar_prev
    return reduced_gaussian_log_prob(x, per_sample(ratio.sqrt(), x_next) * x_next, (1 - ratio).sqrt(), reduction)


def forward_looking_log_flow(learned: Tensor, reward_estimate: Tensor, reward_scale: float) -> Tensor:
    """log F(x_t) = F_φ(x_t) + β·r(D(x̂0(x_t))) (DAG's forward-looking parameterisation, arXiv 2406.00633;
    docs/method.md §2.1).

    Notation: ``learned`` → F_φ(x_t, t, c); ``reward_estimate`` → r(D(x̂0_θ(x_t))); ``reward_scale`` → β. (N,).
    """
    return learned + reward_scale * reward_estimate


def db_residual(log_flow: Tensor, log_pf: Tensor, log_prior: Tensor, log_flow_next: Tensor) -> Tensor:
    """log F(x) + log P_F(x'|x) − log Prior(x, x') − log F(x'); zero when detailed balance holds. All (N,).

    Notation: ``log_prior`` → log P_B(x|x') (DB) or log P_F^#(x'|x) (residual DB); ``log_flow_next`` → β·r(x_T)
    on terminal transitions (docs/method.md §2.1, [PROJ] DB equation; detailed balance: arXiv 2111.09266).
    """
    return log_flow + log_pf - log_prior - log_flow_next


def scalar_log_flow(field: Tensor) -> Tensor:
    """F_φ = the mean of the flow head's output field over all non-batch dims: (B, C, H, W) → (B,).

    Notation: ``field`` → g_φ(x_t, t, c), the flow head's output; the mean is global average pooling followed by
    the head's linear output layer, i.e. a scalar head on the UNet trunk (see the module docstring).
    """
    return field.flatten(1).mean(dim=1)


# ---- the objective --------------------------------------------------------------------------------------------------
class ScalarDBObjective(Objective):
    """Base of DB and residual DB; subclasses define the prior log-probability log Prior(x, x').

    Args:
        reward_scale: β, the reward exponent of the target (R^β = exp(β·r)).
        forward_looking: add β·r(D(x̂0_θ(x_t))) to the learned log-flow (DAG); False learns F_φ alone.
        trust_region_scale: λ, weight of mean‖ε̂_θ(x,t) − ε̂_old(x,t)‖² against the behaviour model's stored CFG
            output (docs/method.md §2.8; DAG uses 1). Its gradient is zero until the policy has moved away from the one
            that sampled the rollout: it acts with ``--model.optimization.off_policy`` or several optimizer steps per
            rollout.
        timestep_fraction: fraction of the T steps trained per trajectory (K = int(T·fraction) + 1 with the terminal).
        low_variance_subsampling: stratify the trained steps over contiguous chunks (docs/method.md §2.10).
        log_prob_reduction: ``mean`` over the state's elements (DAG; the effective reward exponent is then β·C·H·W)
            or ``sum`` (the true log-densities: the optimum samples ∝ R^β, or p^#·R^β for residual DB).
    """

    def __init__(
        self,
        reward_scale: float = 1.0,
        forward_looking: bool = True,
        trust_region_scale: float = 0.0,
        timestep_fraction: float = 0.1,
        low_variance_subsampling: bool = True,
        log_prob_reduction: LogProbReduction = "mean",
    ):
        super().__init__()
        if reward_scale < 0:
            raise ValueError("--model.objective.reward_scale must be >= 0")
        if trust_region_scale < 0:
            raise ValueError("--model.objective.trust_region_scale must be >= 0")
        if not 0 < timestep_fraction <= 1:
            raise ValueError("--model.objective.timestep_fraction must be in (0, 1]")
        self.reward_scale, self.forward_looking = reward_scale, forward_looking
        self.trust_region_scale = trust_region_scale
        if log_prob_reduction not in ("mean", "sum"):
            raise ValueError("--model.objective.log_prob_reduction must be 'mean' or 'sum'")
        self.timestep_fraction, self.low_variance_subsampling = timestep_fraction, low_variance_subsampling
        self.log_prob_reduction: LogProbReduction = log_prob_reduction

    @property
    def uses_flow_head(self) -> bool:
        return True  # the trunk of the scalar log-flow F_φ (see the module docstring)

    @property
    def target_beta(self) -> float:
        return self.reward_scale

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        return rollout.subsampled_transitions(self.timestep_fraction, self.low_variance_subsampling, generator)

    @abstractmethod
    def prior_log_prob(
        self, chunk: Transitions, ctx: ObjectiveContext, std: Tensor, abar_t: Tensor, abar_prev: Tensor
    ) -> Tensor:
        """(N,) log Prior(x, x') of each transition (reduced by ``log_prob_reduction``); a constant for every
        parameter."""

    # ---- flows --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reward_estimate(self, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext) -> Tensor:
        """r(D(x̂0)) without gradients: the forward-looking part of the flow is a target, not a path for gradients."""
        rewards = ctx.reward(ctx.policy.decode(x0_hat), prompts)
        if not torch.isfinite(rewards).all():
            raise FloatingPointError("the reward returned NaN/inf on a forward-looking x̂0 (see --model.reward)")
        return rewards.float()

    def log_flow_current(self, chunk: Transitions, eps: Tensor, abar_t: Tensor, ctx: ObjectiveContext) -> Tensor:
        """log F(x) at the transition's start (never terminal); reuses the policy pass ε̂_θ(x, t) for x̂0."""
        learned = scalar_log_flow(ctx.flow_head(chunk.x, chunk.t, chunk.prompt_embeds.embeds))
        if not self.forward_looking:
            return learned
        estimate = self.reward_estimate(predicted_x0(chunk.x, eps.detach(), abar_t), chunk.prompts, ctx)
        return forward_looking_log_flow(learned, estimate, self.reward_scale)

    def log_flow_next(self, chunk: Transitions, abar_prev: Tensor, ctx: ObjectiveContext) -> Tensor:
        """log F(x'): β·r(x_T) (the stored reward of the final sample) on terminal transitions, else the learned,
        forward-looking flow at (x', t − Δ)."""
        terminal = chunk.is_terminal
        log_flow = self.reward_scale * chunk.rewards.float()
        rows = (~terminal).nonzero().squeeze(1)
        if len(rows) == 0:
            return log_flow
        x_next, t_prev, conditioning = chunk.x_next[rows], chunk.t_prev[rows], chunk.prompt_embeds[rows]
        learned = scalar_log_flow(ctx.flow_head(x_next, t_prev, conditioning.embeds))
        if self.forward_looking:
            with torch.no_grad():
                eps = ctx.policy.kernel_output(
                    x_next, t_prev, conditioning, chunk.negative_embeds[rows], ctx.sampler.guidance_scale
                )
            prompts = [chunk.prompts[i] for i in rows.tolist()]
            estimate = self.reward_estimate(predicted_x0(x_next, eps, abar_prev[rows]), prompts, ctx)
            learned = forward_looking_log_flow(learned, estimate, self.reward_scale)
        return log_flow.index_put((rows,), learned)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        policy, sampler = ctx.policy, ctx.sampler
        abar_t, abar_prev = policy.alpha_bar(chunk.t), policy.alpha_bar(chunk.t_prev)
        std = ddim_std(abar_t, abar_prev, sampler.eta)

        log_prior = self.prior_log_prob(chunk, ctx, std, abar_t, abar_prev)
        eps = policy.kernel_output(chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, sampler.guidance_scale)
        mean = ddim_mean(chunk.x, eps, abar_t, abar_prev, std)
        log_pf = reduced_gaussian_log_prob(chunk.x_next, mean, std, self.log_prob_reduction)
        log_flow = self.log_flow_current(chunk, eps, abar_t, ctx)
        log_flow_next = self.log_flow_next(chunk, abar_prev, ctx)

        residual = db_residual(log_flow, log_pf, log_prior, log_flow_next)
        db_loss = residual.pow(2).mean()
        loss = db_loss
        metrics = {
            "objective/db_loss": db_loss.detach(),
            "objective/log_flow": log_flow.detach().mean(),
            "objective/log_pf_minus_prior": (log_pf - log_prior).detach().mean(),
        }
        if self.trust_region_scale > 0:
            trust_region = (eps - chunk.noise_pred_old).pow(2).mean()
            loss = loss + self.trust_region_scale * trust_region
            metrics["objective/trust_region_loss"] = trust_region.detach()
        metrics["objective/loss"] = loss.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
