"""Print what a digits run achieved: the logged reward curve, and fresh samples of the pretrained and the fine-tuned
model scored by the reward and the digit classifier (class histogram = diversity on the embedded model).

Usage: python scripts/summarize_run.py runs/digits_residual_nabla_db [--samples 512] [--target-samples 4096]

The last line is the target fidelity: ``target TV <tv> (floor <floor> ± <std>)``, where the floor is the TV a sampler
that matches the target exactly gets in the same evaluation (docs/evaluation.md).
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
    from gflowdiff.diffusion.sampling import sample_rollout

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
    parser.add_argument("--target-samples", type=int, default=4096, help="exact target samples to draw")
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
    from gflowdiff.training.loading import load_trained_module

    module = load_trained_module(checkpoints[-1])
    plot = version / "class_histograms.png"
    report_samples(module, checkpoints[-1].name, args.samples, args.target_samples, args.seed, plot)


def plot_histograms(histograms: dict[str, list[float]], path: Path) -> None:
    """Grouped bars: each sampler's share of the ten classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(histograms)
    for index, (name, histogram) in enumerate(histograms.items()):
        axis.bar([c + (index - (len(histograms) - 1) / 2) * width for c in range(10)], histogram, width, label=name)
    axis.set_xticks(range(10))
    axis.set_xlabel("digit class (embedded classifier)")
    axis.set_ylabel("share of samples")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_samples(
    module, checkpoint_name: str, samples: int, target_samples: int, seed: int, plot: Path | None = None
) -> None:
    """Fresh fine-tuned and pretrained samples, and exact samples of the target p^#·exp(β·r) by rejection from
    further pretrained samples (independent noise), drawn until ``target_samples`` are accepted."""
    from gflowdiff.evaluation.metrics.target_fidelity import target_fidelity

    prompts = ["a handwritten digit"] * samples
    beta = module.objective.target_beta
    beta = 1.0 if beta is None else float(beta)
    bound = module.reward.upper_bound
    print(f"fresh samples ({samples} each, checkpoint {checkpoint_name}):")
    tuned_rewards, tuned_classes = sample_and_score(module, prompts, seed, pretrained=False)
    pool_rewards, pool_classes = [], []
    accepted, start = 0.0, 0
    while True:  # pretrained draws from other noise; the target's samples are accepted among them
        rewards, classes = sample_and_score(module, prompts, seed + 1_000_003 + start, pretrained=True)
        pool_rewards.append(rewards), pool_classes.append(classes)
        start += samples
        if bound is None:
            break
        accepted += float(torch.exp(beta * (rewards.double() - bound)).sum())  # expected acceptances so far
        if accepted >= target_samples:
            break
    pool_rewards, pool_classes = torch.cat(pool_rewards), torch.cat(pool_classes)
    result = target_fidelity(tuned_classes, pool_classes, pool_rewards, beta, bound, seed=seed)
    rows = [
        ("pretrained", pool_rewards[:samples], class_histogram(pool_classes[:samples])),
        ("fine-tuned", tuned_rewards, class_histogram(tuned_classes)),
    ]
    for name, rewards, histogram in rows:
        shares = " ".join(f"{p:.3f}" for p in histogram)
        print(f"  {name:>10}: reward {rewards.mean():.3f} ± {rewards.std():.3f}   classes 0-9: {shares}")
    how = "exact, by rejection" if result["exact"] else "importance-weighted"
    shares = " ".join(f"{p:.3f}" for p in result["target_histogram"])
    print(f"  {'target':>10}: reward {result['reward']:.3f}            classes 0-9: {shares}  (β = {beta:g}; {how}, "
          f"{result['samples']:.0f} samples from {len(pool_classes)} pretrained draws)")  # fmt: skip
    if plot is not None:
        histograms = {name: histogram for name, _, histogram in rows}
        plot_histograms({**histograms, "target (exact)": result["target_histogram"]}, plot)
        print(f"class histograms: {plot}")
    print(f"target TV {result['tv']:.3f} (floor {result['tv_floor']:.3f} ± {result['tv_floor_std']:.3f})")


if __name__ == "__main__":
    main()
