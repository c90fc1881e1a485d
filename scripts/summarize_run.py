"""Print what a digits run achieved: the logged reward curve, and fresh samples of the pretrained and the fine-tuned
model scored by the reward and the digit classifier (class histogram = diversity on the embedded model).

Usage: python scripts/summarize_run.py runs/digits_residual_nabla_db [--samples 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def latest_version(run_dir: Path) -> Path:
    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise SystemExit(f"no version_* folder under {run_dir}")
    return versions[-1]


def reward_curve(version: Path) -> tuple[list[tuple[int, float]], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("reward/mean")
    wall = scalars[-1].wall_time - scalars[0].wall_time if len(scalars) > 1 else 0.0
    return [(s.step, s.value) for s in scalars], wall


def class_histogram(classes: torch.Tensor) -> list[float]:
    return (torch.bincount(classes, minlength=10).float() / len(classes)).tolist()


@torch.no_grad()
def sample_and_score(module, prompts: list[str], seed: int, pretrained: bool, batch: int = 128):
    from gflowdiff.sampling import sample_rollout

    rewards, classes = [], []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        chunk = prompts[start : start + batch]
        if pretrained:
            with module.policy.reference():
                rollout = sample_rollout(module.policy, chunk, module.reward, module.sampler, generator)
        else:
            rollout = sample_rollout(module.policy, chunk, module.reward, module.sampler, generator)
        rewards.append(rollout.rewards)
        classes.append(module.reward.predict_classes(rollout.images))
    return torch.cat(rewards), torch.cat(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()

    version = latest_version(args.run_dir)
    curve, wall = reward_curve(version)
    first = sum(v for _, v in curve[:5]) / min(5, len(curve))
    last = sum(v for _, v in curve[-5:]) / min(5, len(curve))
    print(f"run: {version}")
    print(f"logged reward/mean: first 5 steps {first:.3f}, last 5 steps {last:.3f} ({len(curve)} steps, {wall:.0f} s)")

    checkpoints = sorted((version / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        print("no checkpoint found; skipping the sample evaluation")
        return
    from gflowdiff.checkpointing import load_trained_module

    module = load_trained_module(checkpoints[-1])
    prompts = ["a handwritten digit"] * args.samples
    beta = float(getattr(module.objective, "reward_scale", 1.0))
    print(f"fresh samples ({args.samples} each, checkpoint {checkpoints[-1].name}):")
    results = {}
    for name, pretrained in (("pretrained", True), ("fine-tuned", False)):
        rewards, classes = sample_and_score(module, prompts, args.seed, pretrained)
        results[name] = (rewards, classes)
        histogram = " ".join(f"{p:.2f}" for p in class_histogram(classes))
        print(f"  {name:>10}: reward {rewards.mean():.3f} ± {rewards.std():.3f}   classes 0-9: {histogram}")
    # The tilted target p_pretrained(x)·exp(β·r(x)), estimated by importance-weighting the pretrained samples.
    from gflowdiff.metrics import importance_weighted_histogram, total_variation
    from gflowdiff.metrics.target_fidelity import importance_weights

    rewards, classes = results["pretrained"]
    target = importance_weighted_histogram(classes, rewards, beta, num_classes=10)
    target_reward = (importance_weights(rewards, beta) * rewards.double()).sum()
    tuned = torch.tensor(class_histogram(results["fine-tuned"][1]))
    histogram = " ".join(f"{p:.2f}" for p in target.tolist())
    print(f"  {'target':>10}: reward {target_reward:.3f}            classes 0-9: {histogram}  (β = {beta:g})")
    print(f"  total variation (fine-tuned vs target class histograms): {total_variation(tuned, target):.3f}")


if __name__ == "__main__":
    main()
