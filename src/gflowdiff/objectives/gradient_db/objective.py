"""Shared machinery of the gradient-informed detailed-balance objectives (∇-DB and residual ∇-DB).

Both regress the policy's scores of a transition x → x' onto "prior" scores plus flow scores (docs/method.md §2.2–2.3):

    forward:  ∇_{x'} log P_F(x'|x) − prior_fwd  =  ∇_{x'} log F(x')      (terminal: β·∇ log R(x_T))
    reverse:  ∇_x    log P_F(x'|x) − prior_rev  = −∇_x    log F(x)

where the prior is the backward policy P_B (∇-DB) or the pretrained policy P_F^# (residual ∇-DB). The flow score is
parameterised "forward-looking" (docs/method.md §2.4):
∇ log F(x_t) ≈ g_φ(x_t, t, c) + β·γ_t·∇_{x_t} r(D(x̂0_θ(x_t, t))).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from torch import Tensor

from gflowdiff.diffusion.conditioning import Conditioning
from gflowdiff.diffusion.kernels import TransitionStep
from gflowdiff.diffusion.math import (
    per_sample,
)
from gflowdiff.diffusion.sampling import sample_rollout
from gflowdiff.diffusion.types import ObjectiveOutput, Rollout, Transitions
from gflowdiff.objectives.base import Objective, ObjectiveContext
from gflowdiff.objectives.gradient_db._stacked_passes import stacked_passes
from gflowdiff.objectives.gradient_db.math import (
    GuessWeighting,
    TransitionWeighting,
    guess_weight,
    mean_square,
    nabla_db_residuals,
    shared_state_order,
    transition_weight,
)
from gflowdiff.objectives.gradient_db.pathwise_flow import pathwise_flow_scores, pathwise_target_weights
from gflowdiff.objectives.gradient_db.scores import PolicyPass, Scores
from gflowdiff.objectives.value_flow_head import Denoiser, soft_labels, value_fit_loss
from gflowdiff.rewards.base import Reward

PassStructure = Literal["fused", "stacked"]


# ---- the objective --------------------------------------------------------------------------------------------------
class GradientDBObjective(Objective):
    """Base of ∇-DB and residual ∇-DB; subclasses define the prior scores.

    Args:
        reward_scale: β, the reward exponent of the target (R^β); multiplies every reward gradient.
        reverse_loss_scale: w_B, weight of the reverse condition; 0 trains with the forward condition only.
        trust_region_scale: λ, weight of mean‖ε̂_θ(x,t) − ε̂_old(x,t)‖² against the behaviour model's stored CFG
            output (docs/method.md §2.8).
        use_flow_head: learn the correction g_φ; False trusts the forward-looking reward guess alone (the
            reference's ``no_flow``: also sets the reverse weight to 0).
        reward_guess_weighting: γ_t of the forward-looking guess; ``off`` leaves the flow score to g_φ alone.
        transition_weighting: ``none`` (the reference) or ``variance``: scale each transition's residuals by σ_t²
            so that early, high-noise transitions are not drowned by the last ones (same optimum).
        timestep_fraction: fraction of the T steps trained per trajectory (K = int(T·fraction) + 1 with the terminal).
        low_variance_subsampling: stratify the trained steps over contiguous chunks (docs/method.md §2.10).
        pass_structure: how the loss is computed, not what: ``fused`` (default) takes the policy's reverse score and
            the reward guess at x in one vector-Jacobian product, frees the x' pass before the x pass (one UNet
            graph alive at a time), and where a batch holds two transitions that meet at one state it runs the
            VAE decoder and reward there once; ``stacked`` computes the same with the UNet passes at x and x' (and the
            pretrained pass at x) batched into one forward and one input-gradient backward, for GPUs that a B-row
            pass leaves idle (more memory). Both are checked against the reference code's passes, one at a time
            (docs/method.md §3.1), kept as a test oracle (tests/objectives/reference_structure.py).
        adjacent_pairs: train steps in adjacent pairs (j, j + 1), see
            :func:`gflowdiff.diffusion.subsampling.subsample_adjacent_pairs`, so that the fused structure saves one
            VAE-decoder + reward forward/backward per pair. Each transition's loss is unchanged; which transitions
            are trained together changes.
        detach_flow_in_forward_target: use g_φ(x') in the forward target as a constant, so that g_φ is trained by
            the reverse and terminal conditions only (the reference trains it through the forward target too). Same
            optimum. In the analytic Gaussian test (tests/objectives/test_gaussian_target.py) at w_B = 1 it reaches the
            fixed-variance floor of the covariance error, where the reference's choice loses ~25 % of a curved
            reward's tilt; its mean converged more slowly there. ``None`` (default): detached whenever something
            else trains g_φ (w_B > 0 or a flow fit), else not (the reference's choice); True needs one of them.
        reward_chunk_size: run the VAE decoder + reward forward/backward of the fused and stacked structures on at
            most this many images at a time (``None``: all at once). Same gradients; less peak memory at large
            image sizes, where the decoder's graph is the largest one alive.
        pathwise_flow_scale: w_P, weight of a regression of g_φ, at every state x_j (j = 1 … T−1) of each rollout,
            onto the pathwise flow score a_j (gradient_db/pathwise_flow.py), importance-weighted by
            ``pathwise_target_weights`` so that its minimiser is the exact flow score ∇ log F̃(x_j) whatever the
            policy; residuals × σ² as ``transition_weighting`` says. Costs T vector-Jacobian products of the frozen
            UNet per trajectory and one flow-head pass over all states. g_φ is then the whole flow score: needs
            ``reward_guess_weighting: off``. 0 disables.
        forward_flow_target: the flow score at x' in the forward condition: ``learned`` (g_φ + the reward guess, the
            paper's) or ``pathwise`` (its pathwise estimate a(x'); the policy then regresses onto it directly).
        flow_head_fit: how g_φ is trained: ``detailed_balance`` (the paper: through the ∇-DB residuals, plus the
            pathwise fits above when enabled) or ``value`` (a scalar flow F̃_φ ∈ (0, 1) fitted by regression to its
            definition E_#[R^β | x_t] on pretrained trajectories before training, objectives/value_flow_head.py; the
            flow score is its log-gradient). ``value`` needs a reward with a known upper bound,
            ``reward_guess_weighting: off`` and ``reverse_loss_scale: 0`` (nothing trainable is left in the reverse
            condition).
        value_warmup_trajectories: with ``flow_head_fit: value``, pretrained trajectories sampled at the start of
            training to fit F̃_φ before the first update. F̃ does not depend on the policy, so this one fit serves
            the whole run (measured: refitting on each step's 16 fresh pretrained trajectories at the flow head's
            lr made the fit worse, BCE 0.39 → 0.50 in 20 steps).
        value_warmup_epochs: passes over the warm-up trajectories' states.
        value_head_input: what F̃_φ reads: ``state`` (x_t) or ``state_and_denoised`` (x_t and the pretrained
            model's x̂0_#(x_t): the same minimiser F̃(x_t); its flow score runs through the frozen model, one more
            pass and VJP per evaluation). Measured on the digits (docs/why-residual-nabla-db-stalled.md): guidance
            with the x̂0-reading head is at the floor (TV 0.040–0.044 against 0.054–0.061), but a policy trained on
            it is not better (TV 0.071–0.109 at 100 steps, the x_t head's 0.050–0.101), so ``state`` stays the default.
        flow_score_point: where the forward condition reads the fitted flow score ∇ log F̃_φ: ``next_state`` (at the
            sampled x', the ∇-DB condition as written) or ``step_mean`` (at the step's mean: μ_#(x) for residual
            ∇-DB, whose policy mean is then regressed onto μ_# + σ²·∇ log F̃_φ(μ_#), the first-order expansion of
            the tilted kernel P_F^#·F̃(x')/F̃(x), the same continuous-time limit; the policy's own mean, detached,
            for ∇-DB). Needs ``flow_head_fit: value``; measured: docs/why-residual-nabla-db-stalled.md.
        pathwise_weighting: with ``forward_flow_target: pathwise``, weight each transition's residual by
            R(x_T)^β·Π_{k≥j} P_F^#/P_F^b (gradient_db/pathwise_flow.py: pathwise_target_weights), which makes the
            minimiser the exact tilted kernel's mean shift at every iteration; False: unweighted (exact only once
            the policy samples the target).
    """

    requires_reward_gradient = True
    kernel_families = ("diffusion", "flow")  # the kernel's mean, std, log-prob and scores only (docs/method.md §10)
    stacks_pretrained_pass = False  # True where the prior is the pretrained UNet (residual ∇-DB): see ``stacked``

    def __init__(
        self,
        reward_scale: float = 1.0,
        reverse_loss_scale: float = 1.0,
        trust_region_scale: float = 0.0,
        use_flow_head: bool = True,
        reward_guess_weighting: GuessWeighting = "alpha_bar",
        transition_weighting: TransitionWeighting = "none",
        timestep_fraction: float = 0.1,
        low_variance_subsampling: bool = True,
        pass_structure: PassStructure = "fused",
        adjacent_pairs: bool = False,
        detach_flow_in_forward_target: bool | None = None,
        reward_chunk_size: int | None = None,
        pathwise_flow_scale: float = 0.0,
        forward_flow_target: Literal["learned", "pathwise"] = "learned",
        pathwise_weighting: bool = True,
        flow_head_fit: Literal["detailed_balance", "value"] = "detailed_balance",
        value_warmup_trajectories: int = 4096,
        value_warmup_epochs: int = 6,
        value_head_input: Literal["state", "state_and_denoised"] = "state",
        flow_score_point: Literal["next_state", "step_mean"] = "next_state",
    ):
        super().__init__()
        if pass_structure not in ("fused", "stacked"):
            raise ValueError(f"--model.objective.pass_structure must be fused or stacked, got {pass_structure!r}")
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
        trained_elsewhere = reverse_loss_scale > 0 or pathwise_flow_scale > 0
        if detach_flow_in_forward_target is None:
            detach_flow_in_forward_target = trained_elsewhere
        if detach_flow_in_forward_target and use_flow_head and not trained_elsewhere:
            raise ValueError(
                "--model.objective.detach_flow_in_forward_target needs --model.objective.reverse_loss_scale > 0 (or "
                "a pathwise flow fit): otherwise the flow head would be trained on terminal states only"
            )
        self.reward_scale = reward_scale
        self.reverse_loss_scale = reverse_loss_scale if use_flow_head else 0.0
        self.trust_region_scale = trust_region_scale
        self.use_flow_head = use_flow_head
        self.reward_guess_weighting = reward_guess_weighting
        self.transition_weighting = transition_weighting
        self.timestep_fraction = timestep_fraction
        self.low_variance_subsampling = low_variance_subsampling
        self.pass_structure = pass_structure
        self.adjacent_pairs = adjacent_pairs
        self.detach_flow_in_forward_target = detach_flow_in_forward_target
        self.reward_chunk_size = reward_chunk_size
        if pathwise_flow_scale < 0:
            raise ValueError("--model.objective.pathwise_flow_scale must be >= 0")
        if pathwise_flow_scale > 0 and (not use_flow_head or reward_guess_weighting != "off"):
            raise ValueError(
                "--model.objective.pathwise_flow_scale > 0 fits g_φ as the whole flow score: it needs "
                "use_flow_head: true and reward_guess_weighting: off"
            )
        if forward_flow_target not in ("learned", "pathwise"):
            raise ValueError(
                f"--model.objective.forward_flow_target must be learned or pathwise, got {forward_flow_target!r}"
            )
        self.pathwise_flow_scale = pathwise_flow_scale
        self.forward_flow_target = forward_flow_target
        self.pathwise_weighting = pathwise_weighting
        if flow_head_fit not in ("detailed_balance", "value"):
            raise ValueError(
                f"--model.objective.flow_head_fit must be detailed_balance or value, got {flow_head_fit!r}"
            )
        if flow_head_fit == "value" and (
            not use_flow_head or reward_guess_weighting != "off" or reverse_loss_scale > 0
        ):
            raise ValueError(
                "--model.objective.flow_head_fit value makes the flow head the whole flow score, fitted by "
                "regression: it needs use_flow_head: true, reward_guess_weighting: off and reverse_loss_scale: 0"
            )
        if value_warmup_trajectories < 0 or value_warmup_epochs < 0:
            raise ValueError("--model.objective.value_warmup_trajectories and value_warmup_epochs must be >= 0")
        if value_head_input not in ("state", "state_and_denoised"):
            raise ValueError(
                f"--model.objective.value_head_input must be state or state_and_denoised, got {value_head_input!r}"
            )
        if flow_head_fit == "value" and pathwise_flow_scale > 0:
            raise ValueError(
                "--model.objective.pathwise_flow_scale fits a score head g_φ: not with flow_head_fit: value"
            )
        self.flow_head_fit = flow_head_fit
        self.value_warmup_trajectories, self.value_warmup_epochs = value_warmup_trajectories, value_warmup_epochs
        self.value_head_input = value_head_input
        if flow_score_point not in ("next_state", "step_mean"):
            raise ValueError(
                f"--model.objective.flow_score_point must be next_state or step_mean, got {flow_score_point!r}"
            )
        if flow_score_point == "step_mean" and flow_head_fit != "value":
            raise ValueError(
                "--model.objective.flow_score_point step_mean evaluates the fitted value head at the step's mean: "
                "it needs flow_head_fit: value"
            )
        self.flow_score_point = flow_score_point

    @property
    def uses_flow_head(self) -> bool:
        return self.use_flow_head

    @property
    def flow_head_kind(self) -> str:
        """``score`` (g_φ, a vector field: objectives/flow_head.py) or ``value`` (F̃_φ, a scalar: value_flow_head.py)."""
        return "value" if self.flow_head_fit == "value" else "score"

    @property
    def value_head_reads_denoised(self) -> bool:
        """Whether the value head F̃_φ reads x̂0_#(x) besides x (``value_head_input: state_and_denoised``)."""
        return self.flow_head_fit == "value" and self.value_head_input == "state_and_denoised"

    def pretrained_denoiser(
        self, ctx: ObjectiveContext, t: Tensor, prompt_embeds: Conditioning, negative_embeds: Conditioning,
        step: TransitionStep, at_next: bool,
    ) -> Denoiser | None:  # fmt: skip
        """x ↦ x̂0_#(x) of the frozen model at timesteps ``t`` (the step's x' when ``at_next``, else its x),
        differentiable in x, for a value head that reads it; None for one that does not."""
        if not self.value_head_reads_denoised:
            return None
        policy, guidance = ctx.policy, ctx.sampler.guidance_scale

        def denoise(x: Tensor) -> Tensor:
            with policy.reference():
                output = policy.kernel_output(x, t, prompt_embeds, negative_embeds, guidance)
            return step.x0_next(x, output) if at_next else step.x0(x, output)

        return denoise

    def check_compatible(self, reward: Reward) -> None:
        super().check_compatible(reward)
        if self.flow_head_fit == "value" and reward.upper_bound is None:
            raise ValueError(
                f"--model.objective.flow_head_fit value needs a reward with a known upper bound (soft labels "
                f"exp(β·(r − r_max)) ≤ 1); --model.reward {type(reward).__name__} declares none"
            )

    @torch.no_grad()
    def pretrained_value_data(self, ctx: ObjectiveContext, prompts: list[str]) -> tuple[Tensor, ...]:
        """States x_0 … x_{T−1} of pretrained trajectories for ``prompts`` with their timesteps, prompt embeddings,
        soft labels exp(β·(r(x_T) − r_max)) and pretrained x̂0_#(x_t) (from the rollout's own model outputs; None
        for a head that does not read it), flattened to (B·T, …)."""
        with ctx.policy.reference():
            rollout = sample_rollout(ctx.policy, prompts, ctx.reward, ctx.sampler, ctx.generator)
        steps, batch = rollout.num_steps, rollout.batch_size
        labels = soft_labels(rollout.rewards, self.reward_scale, float(ctx.reward.upper_bound))
        states, timesteps = rollout.latents[:, :steps].flatten(0, 1), rollout.timesteps.repeat(batch)
        denoised = None
        if self.value_head_reads_denoised:
            step = ctx.policy.transition_step(timesteps, rollout.prev_timesteps.repeat(batch), ctx.sampler.eta)
            denoised = step.x0(states, rollout.noise_preds.flatten(0, 1))
        return (
            states,
            timesteps,
            rollout.prompt_embeds.embeds.repeat_interleave(steps, dim=0),
            labels.repeat_interleave(steps),
            denoised,
        )

    def warm_up(self, ctx: ObjectiveContext, prompts: list[str]) -> dict[str, float]:
        """Fit F̃_φ on ``value_warmup_trajectories`` pretrained trajectories (prompts cycled from ``prompts``) before
        the first update, with its own AdamW and a one-cycle schedule; returns the last epoch's mean loss."""
        if self.flow_head_fit != "value" or not self.value_warmup_trajectories or not self.value_warmup_epochs:
            return {}
        batch = 512  # trajectories sampled at a time
        parts = [
            self.pretrained_value_data(ctx, [prompts[(start + i) % len(prompts)] for i in range(batch)])
            for start in range(0, self.value_warmup_trajectories, batch)
        ]
        states, timesteps, embeds, labels, denoised = (
            None if tensors[0] is None else torch.cat(tensors) for tensors in zip(*parts, strict=True)
        )
        head, size = ctx.flow_head, 512
        optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
        batches = -(-len(states) // size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=self.value_warmup_epochs * batches)
        epoch_loss = 0.0
        for _ in range(self.value_warmup_epochs):
            order, epoch_loss = torch.randperm(len(states), generator=ctx.generator), 0.0
            for index in order.split(size):
                index = index.to(states.device)
                with torch.enable_grad():
                    loss = value_fit_loss(
                        head, states[index], timesteps[index], embeds[index], labels[index],
                        None if denoised is None else denoised[index],
                    )  # fmt: skip
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                schedule.step()
                epoch_loss += float(loss.detach()) * len(index) / len(states)
        head.zero_grad(set_to_none=True)
        return {"objective/value_warmup_loss": epoch_loss}

    @property
    def guesses_reward_at_x(self) -> bool:
        """Whether ∇_x log F(x) has the term β·γ_t·∇_x r(D(x̂0_θ(x, t))) (docs/method.md §2.4)."""
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
        """β·γ_t, the weight of the reward guess in ∇ log F (docs/method.md §2.4). Shape of ``abar``."""
        return self.reward_scale * guess_weight(abar, self.reward_guess_weighting)

    def check_kernel(self, kernel_family: str, model: str) -> None:
        super().check_kernel(kernel_family, model)
        if kernel_family == "flow" and self.needs_pathwise_flow:  # pathwise_flow.py differentiates the DDIM step
            raise ValueError(
                f"--model.objective.pathwise_flow_scale / forward_flow_target pathwise: the pathwise flow targets "
                f"are written for DDIM steps; --model.pretrained_model {model} is a flow model"
            )

    @property
    def needs_pathwise_flow(self) -> bool:
        return self.pathwise_flow_scale > 0 or self.forward_flow_target == "pathwise"

    def prepare_rollout(self, rollout: Rollout, ctx: ObjectiveContext) -> Rollout:
        if self.needs_pathwise_flow:
            rollout.flow_targets, pretrained_log_probs = pathwise_flow_scores(
                ctx.policy, ctx.reward, ctx.sampler, rollout, self.reward_scale
            )
            if self.pathwise_weighting:
                rollout.flow_target_weights = pathwise_target_weights(
                    rollout.rewards, pretrained_log_probs, rollout.log_probs, self.reward_scale
                )
        return rollout

    @property
    def target_beta(self) -> float:
        return self.reward_scale

    def rollout_loss(self, rollout: Rollout, ctx: ObjectiveContext) -> ObjectiveOutput | None:
        """The flow-head fit of ``pathwise_flow_scale``: w_P · mean_j w_j·‖σ_{j−1}²·(g_φ(x_j) − a_j)‖² over the
        states x_1 … x_{T−1} of the rollout; x_T needs no fit (its flow score is β·∇r exactly), x_0 is never an x'."""
        if self.pathwise_flow_scale == 0 or rollout.num_steps < 2:
            return None
        batch, count = rollout.batch_size, rollout.num_steps - 1
        timesteps = rollout.timesteps[1:].repeat(batch)  # x_j is the state before sampler step j
        # the step into x_j starts at t_{j−1}
        step = ctx.policy.transition_step(rollout.timesteps[:-1], rollout.prev_timesteps[:-1], ctx.sampler.eta)
        std = step.std.repeat(batch)
        embeds = rollout.prompt_embeds.embeds.repeat_interleave(count, dim=0)
        g = ctx.flow_head(rollout.latents[:, 1:-1].flatten(0, 1), timesteps, embeds)
        residual = per_sample(transition_weight(std, self.transition_weighting), g) * (
            g - rollout.flow_targets[:, 1:-1].flatten(0, 1)
        )
        squared = residual.pow(2).flatten(1).mean(dim=1)
        if rollout.flow_target_weights is not None:
            squared = rollout.flow_target_weights[:, 1:-1].flatten() * squared
        fit = squared.mean()
        return ObjectiveOutput(self.pathwise_flow_scale * fit, {"objective/pathwise_flow_loss": fit.detach()})

    def transitions(self, rollout: Rollout, generator: torch.Generator) -> Transitions:
        return rollout.subsampled_transitions(
            self.timestep_fraction, self.low_variance_subsampling, generator, self.adjacent_pairs
        )

    @abstractmethod
    def prior_scores(self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep) -> Scores:
        """Scores of the prior the policy's residual is measured against (reverse is None when w_B = 0)."""

    def prior_from_pretrained_pass(
        self, chunk: Transitions, step: TransitionStep, mean: Tensor, reverse: Tensor | None
    ) -> Scores:
        """The prior's scores from the pretrained pass μ_#(x) and its reverse score, computed by the stacked passes
        (only where ``stacks_pretrained_pass``)."""
        raise NotImplementedError(f"{type(self).__name__} has no pretrained pass")

    # ---- flow scores --------------------------------------------------------------------------------------------
    def guess_point_next(
        self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep
    ) -> tuple[Tensor, Tensor]:
        """(x' as a leaf requiring grad, the point whose reward is differentiated): x̂0_θ(x', t−Δ) on non-terminal
        rows (one policy pass, LoRA on, with CFG), x' itself on terminal rows (the exact terminal condition)."""
        terminal = chunk.is_terminal
        x_next = chunk.x_next.detach().requires_grad_(True)
        x0_hat = x_next
        if (~terminal).any() and self.reward_guess_weighting != "off":
            rows = (~terminal).nonzero().squeeze(1)
            eps = ctx.policy.kernel_output(
                x_next[rows],
                chunk.t_prev[rows],
                chunk.prompt_embeds[rows],
                chunk.negative_embeds[rows],
                ctx.sampler.guidance_scale,
            )
            x0_hat = x_next.index_put((rows,), step.x0_next(x_next[rows], eps, rows))
        return x_next, x0_hat

    def needs_guess_next(self, chunk: Transitions) -> bool:
        return bool(chunk.is_terminal.any()) or self.reward_guess_weighting != "off"

    def flow_from_guess_next(
        self, chunk: Transitions, guess: Tensor, ctx: ObjectiveContext, step: TransitionStep,
        head_point: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """∇_{x'} log F(x') from ∇_{x'} r at the guess point: β·∇r(x_T) on terminal rows (γ = 1, the paper's
        terminal condition; the reference multiplies by ᾱ_0 ≈ 0.999), else g_φ(x', t−Δ) + β·γ·∇_{x'} r(D(x̂0)).
        ``head_point``: where the head is evaluated instead of x' (``flow_score_point: step_mean``).
        Returns (flow score, g_φ(x') on the terminal rows for the terminal loss; never detached)."""
        terminal = chunk.is_terminal
        gamma = per_sample(guess_weight(step.signal_next, self.reward_guess_weighting), guess)  # γ(ᾱ_{t−Δ})
        weight = torch.where(per_sample(terminal, guess).bool(), torch.ones_like(gamma), gamma)
        flow = self.reward_scale * weight * guess
        g_terminal = guess.new_zeros(0)
        if self.use_flow_head:
            denoise = self.pretrained_denoiser(
                ctx, chunk.t_prev, chunk.prompt_embeds, chunk.negative_embeds, step, at_next=True
            )
            options = {} if denoise is None else {"denoise": denoise}  # the score head g_φ takes no denoiser
            point = chunk.x_next if head_point is None else head_point
            g = ctx.flow_head(point, chunk.t_prev, chunk.prompt_embeds.embeds, **options)
            mask = per_sample(terminal, g)
            in_target = g.detach() if self.detach_flow_in_forward_target else g
            flow = flow + (1 - mask) * in_target  # no g on terminal states: the terminal condition is exact
            g_terminal = g[terminal]
        return flow, g_terminal

    def guess_next_gradient(
        self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep
    ) -> tuple[Tensor, Tensor]:
        """(∇_{x'} r, ∇_{x̂0} r) at the guess point (x̂0_θ(x', t−Δ), or x_T on terminal rows). The VAE-decoder +
        reward backward gives the second, a VJP through the x' pass maps it to the first: the chain rule in two
        steps, so the second can be reused at x. The graphs are freed on return (the fused structure calls this
        before the policy pass at x: one UNet graph alive at a time)."""
        if not self.needs_guess_next(chunk):
            zeros = torch.zeros_like(chunk.x_next)
            return zeros, zeros
        with torch.enable_grad():
            x_next, x0_hat = self.guess_point_next(chunk, ctx, step)
            pullback = self.reward_pullback(x0_hat, chunk.prompts, ctx)
            (gradient,) = torch.autograd.grad((x0_hat * pullback).sum(), x_next)
        return gradient.detach(), pullback

    def reverse_score_plus_guess(
        self,
        chunk: Transitions,
        ctx: ObjectiveContext,
        at_x: PolicyPass,
        step: TransitionStep,
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
            total = step.log_prob(chunk.x_next, at_x.mean).sum()  # x' is the stored constant
            if self.guesses_reward_at_x:
                x0_hat = step.x0(x, at_x.eps)
                cotangent = self.reward_pullback_at_x(x0_hat, chunk.prompts, ctx, pullback)
                total = total + (per_sample(self.reward_guess_scale(step.signal), x0_hat) * x0_hat * cotangent).sum()
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

    def policy_pass(self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep) -> PolicyPass:
        """ε̂_θ(x, t) with LoRA on; x requires grad for the reverse score and the reward guess at x."""
        x = chunk.x.detach().requires_grad_(True)
        eps = ctx.policy.kernel_output(
            x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, ctx.sampler.guidance_scale
        )
        mean = step.mean(x, eps)
        return PolicyPass(x, eps, mean, step.forward_score(chunk.x_next, mean))

    def fused_structure_scores(
        self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep, source: Tensor | None
    ) -> tuple[Scores, PolicyPass, Tensor, Tensor | None]:
        """(prior scores, policy pass at x, ∇_{x'} r at the guess point, policy reverse score + reward guess at x).
        The x' pass runs first and is freed, so only one UNet graph and one VAE graph are alive at a time."""
        prior = self.prior_scores(chunk, ctx, step)
        guess_next, pullback_next = self.guess_next_gradient(chunk, ctx, step)
        at_x = self.policy_pass(chunk, ctx, step)
        if self.reverse_loss_scale == 0:
            return prior, at_x, guess_next, None
        # x of the first rows is x' of rows source: their VAE-decoder + reward backward is already done
        pullback = pullback_next[source] if source is not None and len(source) else None
        return prior, at_x, guess_next, self.reverse_score_plus_guess(chunk, ctx, at_x, step, pullback)

    def stacked_structure_scores(
        self, chunk: Transitions, ctx: ObjectiveContext, step: TransitionStep, source: Tensor | None
    ) -> tuple[Scores, PolicyPass, Tensor, Tensor | None]:
        """The same four as :meth:`fused_structure_scores`, from one stacked UNet forward and backward."""
        passes = stacked_passes(self, chunk, ctx, step, source)
        if self.stacks_pretrained_pass:
            prior = self.prior_from_pretrained_pass(chunk, step, passes.pretrained_mean, passes.pretrained_reverse)
        else:
            prior = self.prior_scores(chunk, ctx, step)
        forward = step.forward_score(chunk.x_next, passes.policy_mean)
        at_x = PolicyPass(passes.x, passes.policy_eps, passes.policy_mean, forward)
        return prior, at_x, passes.guess_next, passes.reverse_plus_guess

    # ---- loss ---------------------------------------------------------------------------------------------------
    def loss(self, chunk: Transitions, ctx: ObjectiveContext) -> ObjectiveOutput:
        """One path for every pass structure: the structure computes the scores (prior, policy at x, the reward
        guess at x', the policy's reverse score + the guess at x), :func:`nabla_db_residuals` turns them into the
        forward and reverse residuals, :meth:`loss_from_residuals` weights and sums them."""
        source = None
        if self.reverse_loss_scale > 0 and self.guesses_reward_at_x:
            order, source = shared_state_order(chunk.trajectory, chunk.step)
            if len(source):
                # The loss is a mean over rows: reordering them changes nothing but puts the shared states first.
                chunk = chunk.select(order)
        step = ctx.policy.transition_step(chunk.t, chunk.t_prev, ctx.sampler.eta)
        stacked = self.pass_structure == "stacked"
        structure_scores = self.stacked_structure_scores if stacked else self.fused_structure_scores
        prior, at_x, guess_next, policy_rev_plus_guess = structure_scores(chunk, ctx, step, source)
        head_point = None
        if self.flow_score_point == "step_mean":  # μ_#(x) (residual ∇-DB), else the policy's own mean, detached
            head_point = prior.mean if prior.mean is not None else at_x.mean.detach()
        flow_next, g_terminal = self.flow_from_guess_next(chunk, guess_next, ctx, step, head_point)
        g_cur = None
        if policy_rev_plus_guess is not None:
            # flow_cur = g_φ(x) + β·γ_t·∇_x r: its reward part is already in policy_rev_plus_guess (docs/method.md §2.3)
            g_cur = ctx.flow_head(chunk.x, chunk.t, chunk.prompt_embeds.embeds) if self.use_flow_head else 0.0
        forward_residual, reverse_residual = nabla_db_residuals(
            at_x.forward_score, prior.forward, flow_next, policy_rev_plus_guess, prior.reverse, g_cur
        )
        return self.loss_from_residuals(chunk, step.std, at_x, prior, flow_next, forward_residual, reverse_residual,
                                        g_terminal)  # fmt: skip

    def loss_from_residuals(
        self,
        chunk: Transitions,
        std: Tensor,
        at_x: PolicyPass,
        prior: Scores,
        flow_next: Tensor,
        forward_residual: Tensor,
        reverse_residual: Tensor | None,
        g_terminal: Tensor,
    ) -> ObjectiveOutput:
        """The loss of a chunk from its residuals: transition weights, the forward, reverse, terminal and
        trust-region terms (docs/method.md §2.6), each a mean over the chunk's transitions."""
        if self.forward_flow_target == "pathwise":  # the policy regresses onto a(x') instead of g_φ + guess
            forward_residual = forward_residual + flow_next - chunk.flow_target_next
        weight = per_sample(transition_weight(std, self.transition_weighting), forward_residual)
        forward_residual = weight * forward_residual
        reverse_residual = None if reverse_residual is None else weight * reverse_residual

        pathwise_forward = self.forward_flow_target == "pathwise" and chunk.flow_target_weights is not None
        if pathwise_forward:  # importance weights of the pathwise targets (mean 1 per step)
            forward_loss = (chunk.flow_target_weights * forward_residual.pow(2).flatten(1).mean(dim=1)).mean()
        else:
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
            # ‖g_φ(x_T)‖² → 0: the learned correction vanishes on terminal states ("loss_terminal",
            # docs/method.md §2.6). A mean over the chunk's transitions (non-terminal ones contribute 0), like every
            # other term, so that its weight in a step does not depend on how the step is split into chunks.
            terminal_loss = g_terminal.pow(2).flatten(1).mean(dim=1).sum() / len(chunk)
            loss = loss + terminal_loss
            metrics["objective/terminal_loss"] = terminal_loss.detach()
        if self.trust_region_scale > 0:
            trust_region = mean_square(at_x.eps - chunk.noise_pred_old)
            loss = loss + self.trust_region_scale * trust_region
            metrics["objective/trust_region_loss"] = trust_region.detach()
        metrics["objective/loss"] = loss.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
