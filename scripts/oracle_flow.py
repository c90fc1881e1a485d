"""Oracle-flow diagnostic for residual ∇-DB on the digits model (docs/why-residual-nabla-db-stalled.md).

The exact residual flow of the digits task is F̃(x_t) = E_{P_F^#}[R(x_T)^β | x_t], a noisy-state "classifier" of the
final outcome. This script
1. samples ``--trajectories`` pretrained trajectories and trains a small time-conditioned network f(x_t, t) ∈ (0, 1)
   on every state with the soft label R(x_T)^β = exp(β·r(x_T)) (binary cross-entropy, whose minimiser is F̃);
2. fine-tunes with residual ∇-DB whose forward condition uses the oracle's flow score ∇_x log f(x', t') at x' instead
   of the learned g_φ + reward guess (``OracleResidualNablaDB``; exact β·∇r(x_T) on the terminal state).
If the policy then reaches the target, what limits residual ∇-DB is learning the flow; if not, it is the policy side.

Usage: python scripts/oracle_flow.py --out runs/oracle [--trajectories 4096] [--epochs 6] -- [gflowdiff fit flags]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.types import Rollout
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.objectives.base import ObjectiveContext
from gflowdiff.objectives.gradient_db.pathwise_flow import terminal_reward_gradient


class NoisyOutcomeClassifier(nn.Module):
    """logit f(x_t, t) for 1×8×8 states; the DDPM timestep enters as a sinusoidal embedding added to every layer."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, 3 * width))
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, padding=1, stride=2)])  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        frequencies = torch.exp(-math.log(1000) * torch.arange(16, device=x.device) / 16)
        angles = t.float().clamp(min=0)[:, None] * frequencies[None]
        shifts = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)).chunk(3, dim=1)
        h = x
        for conv, shift in zip(self.convs, shifts, strict=True):
            h = nn.functional.silu(conv(h) + shift[:, :, None, None])
        return self.head(h).squeeze(1)


def train_classifier(module, trajectories: int, epochs: int, beta: float, seed: int) -> NoisyOutcomeClassifier:
    from gflowdiff.diffusion.sampling import sample_rollout

    generator = torch.Generator().manual_seed(seed)
    states, times, labels = [], [], []
    with torch.no_grad(), module.policy.reference():
        for start in range(0, trajectories, 512):
            prompts = ["a handwritten digit"] * min(512, trajectories - start)
            rollout = sample_rollout(module.policy, prompts, module.reward, module.sampler, generator)
            steps = rollout.num_steps
            states.append(rollout.latents[:, :steps].flatten(0, 1))  # states before each step
            times.append(rollout.timesteps.repeat(len(prompts)))
            labels.append(torch.exp(beta * rollout.rewards).repeat_interleave(steps))
    states, times, labels = torch.cat(states), torch.cat(times), torch.cat(labels).clamp(0, 1)
    classifier = NoisyOutcomeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    batches = math.ceil(len(states) / 512)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * batches)
    for epoch in range(epochs):
        order, total = torch.randperm(len(states), generator=generator), 0.0
        for index in order.split(512):
            loss = nn.functional.binary_cross_entropy_with_logits(classifier(states[index], times[index]),
                                                                  labels[index])  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(index)
        print(f"[oracle] epoch {epoch}: soft-label BCE {total / len(states):.4f}", flush=True)
    return classifier.eval().requires_grad_(False)


def oracle_flow_scores(classifier: NoisyOutcomeClassifier, x: Tensor, t: Tensor) -> Tensor:
    """∇_x log f(x, t) = ∇_x log σ(logit)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(nn.functional.logsigmoid(classifier(leaf, t)).sum(), leaf)
    return gradient.detach()


class OracleResidualNablaDB(ResidualNablaDB):
    """Residual ∇-DB whose forward condition uses the oracle's flow score at x' (a diagnostic, not a method).

    Args:
        classifier_path: the trained NoisyOutcomeClassifier (``torch.save`` state dict).
        reward_scale: β.
        transition_weighting: as ResidualNablaDB's.
        timestep_fraction: as ResidualNablaDB's.
        reverse_loss_scale: ignored (there is no flow head to train); accepted so that a residual ∇-DB config loads.
        trust_region_scale: as ResidualNablaDB's.
        pass_structure: as ResidualNablaDB's.
    """

    def __init__(self, classifier_path: str, reward_scale: float = 1.0, transition_weighting: str = "variance",
                 timestep_fraction: float = 0.1, reverse_loss_scale: float = 0.0, trust_region_scale: float = 0.0,
                 pass_structure: str = "fused"):  # fmt: skip
        super().__init__(reward_scale=reward_scale, use_flow_head=False, reward_guess_weighting="off",
                         transition_weighting=transition_weighting, timestep_fraction=timestep_fraction,
                         trust_region_scale=trust_region_scale, pass_structure=pass_structure,
                         forward_flow_target="pathwise")  # fmt: skip
        self.classifier = NoisyOutcomeClassifier()
        self.classifier.load_state_dict(torch.load(classifier_path))
        self.classifier.requires_grad_(False)

    def prepare_rollout(self, rollout: Rollout, ctx: ObjectiveContext) -> Rollout:
        batch, steps = rollout.batch_size, rollout.num_steps
        states = rollout.latents[:, :steps].flatten(0, 1)
        scores = oracle_flow_scores(self.classifier, states, rollout.timesteps.repeat(batch))
        final = self.reward_scale * terminal_reward_gradient(ctx.policy, ctx.reward, rollout.latents[:, -1],
                                                             rollout.prompts)  # fmt: skip
        rollout.flow_targets = torch.cat([scores.view(batch, steps, *states.shape[1:]), final[:, None]], dim=1)
        return rollout


def main() -> None:
    argv = sys.argv[1:]
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/oracle"))
    parser.add_argument("--config", default="configs/digits/residual_nabla_db.yaml")
    parser.add_argument("--trajectories", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    classifier_path = args.out / "noisy_outcome_classifier.pt"
    if not classifier_path.exists():
        from gflowdiff.diffusion.sampling import SamplerConfig
        from gflowdiff.rewards import DigitClassifierReward
        from gflowdiff.training.module import GFlowDiffModule

        module = GFlowDiffModule(ResidualNablaDB(), DigitClassifierReward(), sampler=SamplerConfig(20, 1.0, 1.0))
        classifier = train_classifier(module, args.trajectories, args.epochs, 1.0, args.seed)
        torch.save(classifier.state_dict(), classifier_path)
    import oracle_flow  # noqa: F401  (this file as an importable module, so that class_path resolves)

    from gflowdiff.cli import main as fit

    fit(["fit", "--config", args.config,
         "--model.objective", "oracle_flow.OracleResidualNablaDB",
         "--model.objective.classifier_path", str(classifier_path),
         "--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.name", "fit",
         *fit_args])  # fmt: skip


if __name__ == "__main__":
    main()
