"""Small dataclasses shared by the sampler, the objectives and the LightningModule."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from gflowdiff.diffusion.conditioning import Conditioning

CONDITIONING_FIELDS = ("prompt_embeds", "negative_embeds")


@dataclass
class Rollout:
    """Trajectories of the behaviour policy, stored without gradients (diffusers' time order).

    ``latents[:, j]`` is the state before sampler step j and ``latents[:, j + 1]`` the state after it, so
    ``latents[:, 0]`` is the initial noise and ``latents[:, -1]`` the generated sample x_T.
    """

    latents: Tensor  # (B, T+1, C, H, W)
    timesteps: Tensor  # (T,) DDPM timestep t of each sampler step
    prev_timesteps: Tensor  # (T,) t − Δ (negative on the last step)
    noise_preds: Tensor  # (B, T, C, H, W) behaviour policy's CFG-combined ε̂ (trust-region anchor, docs/method.md §2.8)
    # (B, T) log P_F(x_{j+1}|x_j) under the behaviour policy (policy-gradient baselines); None for a deterministic
    # sampler (--model.sampler.eta 0), which has no density
    log_probs: Tensor | None
    prompt_embeds: Conditioning  # the prompts' conditioning (text embeddings (B, L, D), pooled, ...)
    negative_embeds: Conditioning  # the CFG branch's (the empty prompt's, or zeros: the family's pipeline rule)
    prompts: list[str]
    images: Tensor  # (B, C_img, H_img, W_img) decoded samples in [0, 1]
    rewards: Tensor  # (B,) log-rewards r(x_T)
    # (B, T+1, C, H, W) pathwise estimates of ∇ log F̃ at every state (objectives/gradient_db/pathwise_flow.py), if the
    # objective asks for them
    flow_targets: Tensor | None = None
    flow_target_weights: Tensor | None = None  # (B, T+1) importance weights of the states' pathwise flow scores

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def transitions(self, trajectory: Tensor, step: Tensor) -> Transitions:
        """Gather the transitions (trajectory[i], step[i]) into a flat batch."""
        trajectory, step = trajectory.to(self.latents.device), step.to(self.latents.device)
        return Transitions(
            x=self.latents[trajectory, step],
            x_next=self.latents[trajectory, step + 1],
            t=self.timesteps[step],
            t_prev=self.prev_timesteps[step],
            step=step,
            noise_pred_old=self.noise_preds[trajectory, step],
            log_prob_old=None if self.log_probs is None else self.log_probs[trajectory, step],
            prompt_embeds=self.prompt_embeds[trajectory],
            negative_embeds=self.negative_embeds[trajectory],
            prompts=[self.prompts[i] for i in trajectory.tolist()],
            rewards=self.rewards[trajectory],
            is_terminal=step == self.num_steps - 1,
            trajectory=trajectory,
            flow_target_next=None if self.flow_targets is None else self.flow_targets[trajectory, step + 1],
            flow_target_weights=(
                None if self.flow_target_weights is None else self.flow_target_weights[trajectory, step]
            ),
        )

    def subsampled_transitions(
        self, fraction: float, low_variance: bool, generator: torch.Generator, adjacent_pairs: bool = False
    ) -> Transitions:
        """The transitions of the steps chosen by :func:`gflowdiff.diffusion.subsampling.subsample_steps` (terminal
        first)."""
        from gflowdiff.diffusion.subsampling import flatten_steps, subsample_steps

        steps = subsample_steps(self.num_steps, self.batch_size, fraction, low_variance, generator, adjacent_pairs)
        return self.transitions(*flatten_steps(steps))

    def to_state(self) -> dict:
        """Tensors and prompts for a checkpoint (the off-policy buffer); the conditioning as plain tensors."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return state | {name: state[name].to_state() for name in CONDITIONING_FIELDS}

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        """A rollout from :meth:`to_state`'s dict (or an older checkpoint's, whose conditioning is a tensor)."""
        state = dict(state)
        for name in CONDITIONING_FIELDS:
            value = state[name]
            state[name] = Conditioning(value) if isinstance(value, Tensor) else Conditioning.from_state(value)
        return cls(**state)


@dataclass
class Transitions:
    """A flat batch of N transitions x → x' taken from a rollout."""

    x: Tensor  # (N, C, H, W) state at t
    x_next: Tensor  # (N, C, H, W) state at t − Δ
    t: Tensor  # (N,)
    t_prev: Tensor  # (N,)
    step: Tensor  # (N,) sampler step index j
    noise_pred_old: Tensor  # (N, C, H, W)
    log_prob_old: Tensor | None  # (N,); None for a deterministic sampler
    prompt_embeds: Conditioning  # N rows
    negative_embeds: Conditioning  # N rows
    prompts: list[str]
    rewards: Tensor  # (N,) reward of the trajectory's final sample
    is_terminal: Tensor  # (N,) bool: x' is the final sample x_T
    trajectory: Tensor  # (N,) index of the trajectory in its rollout
    advantages: Tensor | None = None  # (N,) filled by policy-gradient objectives
    flow_target_next: Tensor | None = None  # (N, C, H, W) pathwise estimate of ∇_{x'} log F̃(x') (Rollout.flow_targets)
    flow_target_weights: Tensor | None = None  # (N,) importance weight of the path from x (pathwise_target_weights)

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, size: int) -> list[Transitions]:
        """Consecutive chunks of at most ``size`` transitions."""
        chunks = []
        for start in range(0, len(self), size):
            index = torch.arange(start, min(start + size, len(self)), device=self.x.device)
            chunks.append(self.select(index))
        return chunks

    def select(self, index: Tensor) -> Transitions:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor | Conditioning):
                values[f.name] = value[index]
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index.tolist()]
            else:
                values[f.name] = value
        return Transitions(**values)


@dataclass
class ObjectiveOutput:
    """A loss to backpropagate and detached scalar metrics named ``objective/<term>``."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
