"""Shared machinery of the gradient-informed detailed-balance objectives (∇-DB and residual ∇-DB).

Both regress the policy's scores of a transition x → x' onto "prior" scores plus flow scores (method.md §2.2–2.3):

    forward:  ∇_{x'} log P_F(x'|x) − prior_fwd  =  ∇_{x'} log F(x')      (terminal: β·∇ log R(x_T))
    reverse:  ∇_x    log P_F(x'|x) − prior_rev  = −∇_x    log F(x)

where the prior is the backward policy P_B (∇-DB) or the pretrained policy P_F^# (residual ∇-DB). The flow score is
parameterised "forward-looking" (§2.4): ∇ log F(x_t) ≈ g_φ(x_t, t, c) + β·γ_t·∇_{x_t} r(D(x̂0_θ(x_t, t))).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gflowdiff.diffusion_math import (
    ddim_mean,
    ddim_std,
    forward_score,
    gaussian_log_prob,
    per_sample,
    predicted_x0,
)
from gflowdiff.objectives._reference_passes import reference_structure_residuals
from gflowdiff.objectives._stacked_passes import stacked_passes
from gflowdiff.objectives.base import Objective, ObjectiveContext
from gflowdiff.objectives.gradient_db_math import (
    GuessWeighting,
    TransitionWeighting,
    guess_weight,
    mean_square,
    shared_state_order,
    transition_weight,
)
from gflowdiff.types import ObjectiveOutput, Rollout, Transitions

PassStructure = Literal["fused", "stacked", "reference"]


# ---- the objective --------------------------------------------------------------------------------------------------
@dataclass
class _Scores:
    forward: Tensor
    reverse: Tensor | None


@dataclass
class _PolicyPass:
    """ε̂_θ(x, t) with LoRA on, x a leaf requiring grad: μ_θ(x) and the forward score ∇_{x'} log P_F(x'|x)."""

    x: Tensor
    eps: Tensor
    mean: Tensor
    forward_score: Tensor


class GradientDBObjective(Objective):
    """Base of ∇-DB and residual ∇-DB; subclasses define the prior scores.

    Args:
        reward_scale: β, the reward exponent of the target (R^β); multiplies every reward gradient.
        reverse_loss_scale: w_B, weight of the reverse condition; 0 trains with the forward condition only.
        trust_region_scale: λ, weight of mean‖ε̂_θ(x,t) − ε̂_old(x,t)‖² against the behaviour model's stored CFG
            output (method.md §2.8).
        use_flow_head: learn the correction g_φ; False trusts the forward-looking reward guess alone (the
            reference's ``no_flow``: also sets the reverse weight to 0).
        reward_guess_weighting: γ_t of the forward-looking guess; ``off`` leaves the flow score to g_φ alone.
        reverse_loss_trains_policy: also backpropagate the reverse residual into the policy (second-order autograd
            through the UNet, much more expensive). The reference uses the reverse term only to train g_φ.
        transition_weighting: ``none`` (the reference) or ``variance``: scale each transition's residuals by σ_t²
            so that early, high-noise transitions are not drowned by the last ones (same optimum).
        timestep_fraction: fraction of the T steps trained per trajectory (K = int(T·fraction) + 1 with the terminal).
        low_variance_subsampling: stratify the trained steps over contiguous chunks (method.md §2.10).
        pass_structure: how the loss is computed, not what: ``fused`` (default) takes the policy's reverse score and
            the reward guess at x in one vector-Jacobian product, frees the x' pass before the x pass (one UNet
            graph alive at a time), and where a batch holds two transitions that meet at one state it runs the
            VAE decoder and reward there once; ``stacked`` computes the same with the UNet passes at x and x' (and the
            pretrained pass at x) batched into one forward and one input-gradient backward, for GPUs that a B-row
            pass leaves idle (more memory); ``reference`` re-creates the reference code's passes (method.md §3.1).
        adjacent_pairs: train steps in adjacent pairs (j, j + 1), see
            :func:`gflowdiff.subsampling.subsample_adjacent_pairs`, so that the fused structure saves one
            VAE-decoder + reward forward/backward per pair. Each transition's loss is unchanged; which transitions
            are trained together changes.
        detach_flow_in_forward_target: use g_φ(x') in the forward target as a constant, so that g_φ is trained by
            the reverse and terminal conditions only (the reference trains it through the forward target too). Same
            optimum. In the analytic Gaussian test (tests/test_gaussian_target.py) at w_B = 1 it reaches the
            fixed-variance floor of the covariance error, where the reference's choice loses ~25 % of a curved
            reward's tilt; its mean converged more slowly there. Needs w_B > 0.
        reward_chunk_size: run the VAE decoder + reward forward/backward of the fused and stacked structures on at
            most this many images at a time (``None``: all at once). Same gradients; less peak memory at large
            image sizes, where the decoder's graph is the largest one alive.
    """

    requires_reward_gradient = True
    stacks_pretrained_pass = False  # True where the prior is the pretrained UNet (residual ∇-DB): see ``stacked``

    def __init__(
        self,
        reward_scale: float = 1.0,
        reverse_loss_scale: float = 1.0,
        trust_region_scale: float = 0.0,
        use_flow_head: bool = True,
        reward_guess_weighting: GuessWeighting = "alpha_bar",
        reverse_loss_trains_policy: bool = False,
        transition_weighting: TransitionWeighting = "none",
        timestep_fraction: float = 0.1,
        low_variance_subsampling: bool = True,
        pass_structure: PassStructure = "fused",
        adjacent_pairs: bool = False,
        detach_flow_in_forward_target: bool = False,
        reward_chunk_size: int | None = None,
    ):
        super().__init__()
        if pass_structure not in ("fused", "stacked", "reference"):
            raise ValueError(
                f"--model.objective.pass_structure must be fused, stacked or reference, got {pass_structure!r}"
            )
        if reward_scale < 0:
            raise ValueError("--model.objective.reward_scale must be >= 0")
        if reverse_loss_scale < 0:
            raise ValueError("--model.objective.reverse_loss_scale must be >= 0")
        if trust_region_scale < 0:
            raise ValueError("--model.objective.trust_region_scale must be >= 0")
        if reward_chunk_size is not None and reward_chunk_size < 1:
            raise ValueError("--model.objective.reward_chunk_size must be >= 1 (or null: all images at once)")
        if not 0 < timestep_fraction <= 1:
            raise ValueError("--model.objective.timestep_fraction must be in (0, 1]")
        if detach_flow_in_forward_target and use_flow_head and reverse_loss_scale == 0:
            raise ValueError(
                "--model.objective.detach_flow_in_forward_target needs --model.objective.reverse_loss_scale > 0: "
                "with both, the flow head would be trained on terminal states only"
            )
        self.reward_scale = reward_scale
        self.reverse_loss_scale = reverse_loss_scale if use_flow_head else 0.0
        self.trust_region_scale = trust_region_scale
        self.use_flow_head = use_flow_head
        self.reward_guess_weighting = reward_guess_weighting
        self.reverse_loss_trains_policy = reverse_loss_trains_policy
        self.transition_weighting = transition_weighting
        self.timestep_fraction = timestep_fraction
        self.low_variance_subsampling = low_variance_subsampling
        self.pass_structure = pass_structure
        self.adjacent_pairs = adjacent_pairs
        self.detach_flow_in_forward_target = detach_flow_in_forward_target
        self.reward_chunk_size = reward_chunk_size

    @property
    def uses_flow_head(self) -> bool:
        return self.use_flow_head

    @property
    def guesses_reward_at_x(self) -> bool:
        """Whether ∇_x log F(x) has the term β·γ_t·∇_x r(D(x̂0_θ(x, t))) (§2.4)."""
        return self.reward_guess_weighting != "off" and self.reward_scale > 0

    def memory_options(self) -> list[str]:
        options = []
        if self.pass_structure != "fused":
            options.append(
                "--model.objective.init_args.pass_structure fused (one UNet graph alive at a time; now "
                f"{self.pass_structure})"
            )
        if self.reward_chunk_size != 1:
            options.append(
                "--model.objective.init_args.reward_chunk_size 1 (the VAE decoder + reward one image at a time, with "
                "the fused or stacked structure)"
            )
        return options

    def reward_guess_scale(self, abar: Tensor) -> Tensor:
        """β·γ_t, the weight of the reward guess in ∇ log F (§2.4). Shape of ``abar``."""
        return self.reward_scale * guess_weight(abar, self.reward_guess_weighting)

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        return rollout.subsampled_transitions(
            self.timestep_fraction, self.low_variance_subsampling, generator, self.adjacent_pairs
        )

    @abstractmethod
    def prior_scores(
        self, chunk: Transitions, ctx: ObjectiveContext, std: Tensor, abar_t: Tensor, abar_prev: Tensor
    ) -> _Scores:
        """Scores of the prior the policy's residual is measured against (reverse is None when w_B = 0)."""

    def prior_from_pretrained_pass(
        self, chunk: Transitions, std: Tensor, mean: Tensor, reverse: Tensor | None
    ) -> _Scores:
        """The prior's scores from the pretrained pass μ_#(x) and its reverse score, computed by the stacked passes
        (only where ``stacks_pretrained_pass``)."""
        raise NotImplementedError(f"{type(self).__name__} has no pretrained pass")

    # ---- flow scores --------------------------------------------------------------------------------------------
    def guess_point_next(self, chunk: Transitions, ctx: ObjectiveContext, abar_prev: Tensor) -> tuple[Tensor, Tensor]:
        """(x' as a leaf requiring grad, the point whose reward is differentiated): x̂0_θ(x', t−Δ) on non-terminal
        rows (one policy pass, LoRA on, with CFG), x' itself on terminal rows (the exact terminal condition)."""
        terminal = chunk.is_terminal
        x_next = chunk.x_next.detach().requires_grad_(True)
        x0_hat = x_next
        if (~terminal).any() and self.reward_guess_weighting != "off":
            rows = (~terminal).nonzero().squeeze(1)
            eps = ctx.policy.predict_noise(
                x_next[rows],
                chunk.t_prev[rows],
                chunk.prompt_embeds[rows],
                chunk.negative_embeds[rows],
                ctx.sampler.guidance_scale,
            )
            x0_hat = x_next.index_put((rows,), predicted_x0(x_next[rows], eps, abar_prev[rows]))
        return x_next, x0_hat

    def needs_guess_next(self, chunk: Transitions) -> bool:
        return bool(chunk.is_terminal.any()) or self.reward_guess_weighting != "off"

    def flow_from_guess_next(
        self, chunk: Transitions, guess: Tensor, ctx: ObjectiveContext, abar_prev: Tensor
    ) -> tuple[Tensor, Tensor]:
        """∇_{x'} log F(x') from ∇_{x'} r at the guess point: β·∇r(x_T) on terminal rows (γ = 1, the paper's
        terminal condition; the reference multiplies by ᾱ_0 ≈ 0.999), else g_φ(x', t−Δ) + β·γ·∇_{x'} r(D(x̂0)).
        Returns (flow score, g_φ(x') on the terminal rows for the terminal loss; never detached)."""
        terminal = chunk.is_terminal
        gamma = per_sample(guess_weight(abar_prev, self.reward_guess_weighting), guess)
        weight = torch.where(per_sample(terminal, guess).bool(), torch.ones_like(gamma), gamma)
        flow = self.reward_scale * weight * guess
        g_terminal = guess.new_zeros(0)
        if self.use_flow_head:
            g = ctx.flow_head(chunk.x_next, chunk.t_prev, chunk.prompt_embeds)
            mask = per_sample(terminal, g)
            in_target = g.detach() if self.detach_flow_in_forward_target else g
            flow = flow + (1 - mask) * in_target  # no g on terminal states: the terminal condition is exact
            g_terminal = g[terminal]
        return flow, g_terminal

    def guess_next_gradient(
        self, chunk: Transitions, ctx: ObjectiveContext, abar_prev: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(∇_{x'} r, ∇_{x̂0} r) at the guess point (x̂0_θ(x', t−Δ), or x_T on terminal rows). The VAE-decoder +
        reward backward gives the second, a VJP through the x' pass maps it to the first: the chain rule in two
        steps, so the second can be reused at x. The graphs are freed on return (the fused structure calls this
        before the policy pass at x: one UNet graph alive at a time)."""
        if not self.needs_guess_next(chunk):
            zeros = torch.zeros_like(chunk.x_next)
            return zeros, zeros
        with torch.enable_grad():
            x_next, x0_hat = self.guess_point_next(chunk, ctx, abar_prev)
            pullback = self.reward_pullback(x0_hat, chunk.prompts, ctx)
            (gradient,) = torch.autograd.grad((x0_hat * pullback).sum(), x_next)
        return gradient.detach(), pullback

    def reverse_score_plus_guess(
        self,
        chunk: Transitions,
        ctx: ObjectiveContext,
        at_x: _PolicyPass,
        std: Tensor,
        abar_t: Tensor,
        pullback: Tensor | None = None,
    ) -> Tensor:
        """∇_x [log P_F(x'|x) + β·γ_t·r(D(x̂0_θ(x, t)))] = the policy's reverse score + the reward part of ∇_x log F,
        in one vector-Jacobian product through the policy pass at x (the reference takes two). Gradients are
        linear, and the reverse residual only ever uses this sum. The UNet graph is kept for the parameter backward.
        ``pullback``: ∇_{x̂0} r already computed for the first rows by the x' pass of transitions ending there; their
        reward term is then x̂0·pullback, whose x-gradient is the same chain rule without a second VAE/reward pass.
        """
        x = at_x.x
        with torch.enable_grad():
            total = gaussian_log_prob(chunk.x_next, at_x.mean, std).sum()  # x' is the stored constant
            if self.guesses_reward_at_x:
                x0_hat = predicted_x0(x, at_x.eps, abar_t)
                cotangent = self.reward_pullback_at_x(x0_hat, chunk.prompts, ctx, pullback)
                total = total + (per_sample(self.reward_guess_scale(abar_t), x0_hat) * x0_hat * cotangent).sum()
            (gradient,) = torch.autograd.grad(total, x, retain_graph=True)
        return gradient.detach()

    def reward_pullback_at_x(
        self, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext, shared: Tensor | None
    ) -> Tensor:
        """∇_{x̂0} r at x̂0_θ(x, t) of every row, the cotangent of the reward guess at x. The first ``len(shared)``
        rows reuse ``shared``, computed at the same points by the x' pass of the transitions ending there; the
        others run the VAE decoder + reward (with its graph freed before the UNet backward)."""
        n = 0 if shared is None else len(shared)
        parts = [shared] if n else []
        if n < len(x0_hat):
            parts.append(self.reward_pullback(x0_hat[n:], prompts[n:], ctx))
        return torch.cat(parts)

    def reward_pullback(self, x0_hat: Tensor, prompts: list[str], ctx: ObjectiveContext) -> Tensor:
        """∇_{x̂0} r(D(x̂0)): the VAE-decoder and reward backward alone (x̂0 is detached: no UNet backward), on at most
        ``reward_chunk_size`` images at a time. Each image's reward depends on that image alone, so chunks give the
        same gradient; only one chunk's decoder graph is alive at a time."""
        size = self.reward_chunk_size or max(len(x0_hat), 1)
        gradients = []
        with torch.enable_grad():
            for start in range(0, len(x0_hat), size):
                point = x0_hat[start : start + size].detach().requires_grad_(True)
                rewards = ctx.reward(ctx.policy.decode(point), prompts[start : start + size])
                (gradient,) = torch.autograd.grad(rewards.sum(), point)
                gradients.append(gradient.detach())
        return torch.cat(gradients) if gradients else torch.zeros_like(x0_hat)

    def policy_pass(
        self, chunk: Transitions, ctx: ObjectiveContext, abar_t: Tensor, abar_prev: Tensor, std: Tensor
    ) -> _PolicyPass:
        """ε̂_θ(x, t) with LoRA on; x requires grad for the reverse score and the reward guess at x."""
        x = chunk.x.detach().requires_grad_(True)
        eps = ctx.policy.predict_noise(
            x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, ctx.sampler.guidance_scale
        )
        mean = ddim_mean(x, eps, abar_t, abar_prev, std)
        return _PolicyPass(x, eps, mean, forward_score(chunk.x_next, mean, std))

    def fused_structure_scores(
        self,
        chunk: Transitions,
        ctx: ObjectiveContext,
        std: Tensor,
        abar_t: Tensor,
        abar_prev: Tensor,
        source: Tensor | None,
    ) -> tuple[_Scores, _PolicyPass, Tensor, Tensor | None]:
        """(prior scores, policy pass at x, ∇_{x'} r at the guess point, policy reverse score + reward guess at x).
        The x' pass runs first and is freed, so only one UNet graph and one VAE graph are alive at a time."""
        prior = self.prior_scores(chunk, ctx, std, abar_t, abar_prev)
        guess_next, pullback_next = self.guess_next_gradient(chunk, ctx, abar_prev)
        at_x = self.policy_pass(chunk, ctx, abar_t, abar_prev, std)
        if self.reverse_loss_scale == 0:
            return prior, at_x, guess_next, None
        # x of the first rows is x' of rows source: their VAE-decoder + reward backward is already done
        pullback = pullback_next[source] if source is not None and len(source) else None
        return prior, at_x, guess_next, self.reverse_score_plus_guess(chunk, ctx, at_x, std, abar_t, pullback)

    def stacked_structure_scores(
        self,
        chunk: Transitions,
        ctx: ObjectiveContext,
        std: Tensor,
        abar_t: Tensor,
        abar_prev: Tensor,
        source: Tensor | None,
    ) -> tuple[_Scores, _PolicyPass, Tensor, Tensor | None]:
        """The same four as :meth:`fused_structure_scores`, from one stacked UNet forward and backward."""
        passes = stacked_passes(self, chunk, ctx, std, abar_t, abar_prev, source)
        if self.stacks_pretrained_pass:
            prior = self.prior_from_pretrained_pass(chunk, std, passes.pretrained_mean, passes.pretrained_reverse)
        else:
            prior = self.prior_scores(chunk, ctx, std, abar_t, abar_prev)
        at_x = _PolicyPass(
            passes.x, passes.policy_eps, passes.policy_mean, forward_score(chunk.x_next, passes.policy_mean, std)
        )
        return prior, at_x, passes.guess_next, passes.reverse_plus_guess

    # ---- loss ---------------------------------------------------------------------------------------------------
    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        structure = "reference" if self.reverse_loss_trains_policy else self.pass_structure
        source = None
        if structure != "reference" and self.reverse_loss_scale > 0 and self.guesses_reward_at_x:
            order, source = shared_state_order(chunk.trajectory, chunk.step)
            if len(source):
                # The loss is a mean over rows: reordering them changes nothing but puts the shared states first.
                chunk = chunk.select(order)
        policy, sampler = ctx.policy, ctx.sampler
        abar_t, abar_prev = policy.alpha_bar(chunk.t), policy.alpha_bar(chunk.t_prev)
        std = ddim_std(abar_t, abar_prev, sampler.eta)

        if structure == "reference":
            prior = self.prior_scores(chunk, ctx, std, abar_t, abar_prev)
            at_x = self.policy_pass(chunk, ctx, abar_t, abar_prev, std)
            forward_residual, reverse_residual, flow_next, g_terminal = reference_structure_residuals(
                self, chunk, ctx, at_x, std, abar_t, abar_prev, prior
            )
        else:
            if structure == "stacked":
                prior, at_x, guess_next, policy_rev_plus_guess = self.stacked_structure_scores(
                    chunk, ctx, std, abar_t, abar_prev, source
                )
            else:
                prior, at_x, guess_next, policy_rev_plus_guess = self.fused_structure_scores(
                    chunk, ctx, std, abar_t, abar_prev, source
                )
            flow_next, g_terminal = self.flow_from_guess_next(chunk, guess_next, ctx, abar_prev)
            forward_residual = at_x.forward_score - prior.forward - flow_next
            reverse_residual = None
            if policy_rev_plus_guess is not None:
                g_cur = ctx.flow_head(chunk.x, chunk.t, chunk.prompt_embeds) if self.use_flow_head else 0.0
                # policy_rev − prior_rev + flow_cur, with flow_cur = g_φ(x) + β·γ_t·∇_x r (method.md §2.3)
                reverse_residual = policy_rev_plus_guess - prior.reverse + g_cur

        weight = per_sample(transition_weight(std, self.transition_weighting), forward_residual)
        forward_residual = weight * forward_residual
        reverse_residual = None if reverse_residual is None else weight * reverse_residual

        forward_loss = mean_square(forward_residual)
        loss = forward_loss
        metrics = {
            "objective/forward_loss": forward_loss.detach(),
            "objective/policy_score_norm": at_x.forward_score.detach().flatten(1).norm(dim=1).mean(),
            "objective/prior_score_norm": prior.forward.detach().flatten(1).norm(dim=1).mean(),
            "objective/flow_score_norm": flow_next.detach().flatten(1).norm(dim=1).mean(),
        }
        if reverse_residual is not None:
            reverse_loss = mean_square(reverse_residual)
            loss = loss + self.reverse_loss_scale * reverse_loss
            metrics["objective/reverse_loss"] = reverse_loss.detach()
        if g_terminal.numel() > 0:
            # ‖g_φ(x_T)‖² → 0: the learned correction vanishes on terminal states ("loss_terminal", method.md §2.6).
            terminal_loss = mean_square(g_terminal)
            loss = loss + terminal_loss
            metrics["objective/terminal_loss"] = terminal_loss.detach()
        if self.trust_region_scale > 0:
            trust_region = mean_square(at_x.eps - chunk.noise_pred_old)
            loss = loss + self.trust_region_scale * trust_region
            metrics["objective/trust_region_loss"] = trust_region.detach()
        metrics["objective/loss"] = loss.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
