"""The second half of ``gflowdiff compare``: evaluate finished runs, aggregate over seeds, write a table and plots."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gflowdiff.diffusion.types import Rollout
from gflowdiff.evaluation.evaluator import (
    INDEPENDENT_NOISE_OFFSET,
    EvaluationConfig,
    EvaluationSamples,
    Evaluator,
    sample_pair,
)

if TYPE_CHECKING:
    from gflowdiff.experiments.runs import RunSpec
    from gflowdiff.training.module import GFlowDiffModule

EVALUATION_SEED = 20_251_126  # the same noise for every run's evaluation (and for its pretrained reference)
PRETRAINED_ROW = "pretrained (no fine-tuning)"
# Every run with the same pretrained model and sampler gets the same pretrained samples: sampled once per process.
_pretrained_samples: dict[tuple, Rollout] = {}


def load_run(spec: RunSpec) -> tuple[GFlowDiffModule, dict]:
    """A finished run's module (from its last checkpoint) and its saved config."""
    import yaml

    from gflowdiff.training.loading import load_trained_module

    return load_trained_module(spec.last_checkpoint), yaml.safe_load((spec.version / "config.yaml").read_text())


def evaluation_prompts(config: dict, samples: int) -> list[str]:
    """The run's held-out prompts (its data config), cycled to ``samples``."""
    from gflowdiff.training.prompts import load_prompts

    data = config.get("data", {}) or {}
    source = data.get("eval_prompts") or data.get("train_prompts") or "digits"
    prompts = load_prompts(source, "--data.eval_prompts")
    return [prompts[i % len(prompts)] for i in range(samples)]


def report_beta(module: GFlowDiffModule) -> float:
    """β of the target a run is compared with: its objective's; 1 for objectives that target none (ReFL, DRaFT,
    DDPO), the β of every digits config."""
    beta = module.objective.target_beta
    return 1.0 if beta is None else float(beta)


@torch.no_grad()
def evaluate_module(
    module: GFlowDiffModule, prompts: list[str], batch_size: int = 128, pretrained_only: bool = False
) -> dict[str, float]:
    """Metrics of ``module``'s fine-tuned sampler against its pretrained one, from independent noise.
    ``pretrained_only`` puts the pretrained sampler with other noise in the fine-tuned place: the floor of every
    prior distance at this sample count, and the pretrained model's own reward and diversity."""
    from gflowdiff.diffusion.sampling import sample_rollout

    evaluator = Evaluator(EvaluationConfig(), module.reward, report_beta(module))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seed = EVALUATION_SEED + start
        key = (module.hparams.get("pretrained_model"), repr(module.sampler), tuple(chunk), seed)
        if key not in _pretrained_samples:
            with module.policy.reference():
                generator = torch.Generator().manual_seed(seed + INDEPENDENT_NOISE_OFFSET)
                _pretrained_samples[key] = sample_rollout(
                    module.policy, chunk, module.reward, module.sampler, generator
                )
        if pretrained_only:  # the pretrained sampler again, from other noise
            with module.policy.reference():
                generator = torch.Generator().manual_seed(seed + 7_777)
                tuned = sample_rollout(module.policy, chunk, module.reward, module.sampler, generator)
        else:
            tuned = sample_pair(module.policy, chunk, module.reward, module.sampler, seed, False).tuned
        evaluator.update(EvaluationSamples(tuned, _pretrained_samples[key]))
    return evaluator.compute()


def logged_scalars(version: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(s.step, s.value) for s in events.Scalars(tag)]


def evaluate_run(spec: RunSpec, samples: int) -> dict[str, Any]:
    """Metrics of one finished run, cached in ``metrics.json`` next to it."""
    cache = spec.directory / "metrics.json"
    if cache.exists() and cache.stat().st_mtime >= spec.last_checkpoint.stat().st_mtime:
        cached = json.loads(cache.read_text())
        if cached.get("samples") == samples:
            print(f"[compare] reuse  metrics of {spec.name} seed {spec.seed}", flush=True)
            return cached
    print(f"[compare] eval   {spec.name} seed {spec.seed} ({samples} samples)", flush=True)
    module, config = load_run(spec)
    prompts = evaluation_prompts(config, samples)
    step_seconds = [v for _, v in logged_scalars(spec.version, "train/step_seconds")]
    result = {
        "name": spec.name,
        "seed": spec.seed,
        "samples": samples,
        "objective": type(module.objective).__name__,
        "beta": report_beta(module),
        "metrics": evaluate_module(module, prompts),
        "train_seconds": sum(step_seconds) if step_seconds else math.nan,  # rollouts + updates, as logged
        "reward_curve": logged_scalars(spec.version, "reward/mean"),
    }
    cache.write_text(json.dumps(result))
    return result


def evaluate_pretrained(spec: RunSpec, samples: int) -> dict[str, float]:
    """The pretrained row (all runs share one pretrained model), cached in ``<out>/pretrained_metrics.json``."""
    cache = spec.out / "pretrained_metrics.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("samples") == samples:
            return cached["metrics"]
    print(f"[compare] eval   the pretrained model ({samples} samples)", flush=True)
    module, config = load_run(spec)
    metrics = evaluate_module(module, evaluation_prompts(config, samples), pretrained_only=True)
    cache.write_text(json.dumps({"samples": samples, "metrics": metrics}))
    return metrics


def evaluate_runs(specs: list[RunSpec], samples: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every run's metrics, and the pretrained model's (evaluated through the first run's config)."""
    return [evaluate_run(spec, samples) for spec in specs], evaluate_pretrained(specs[0], samples)


# ---- aggregation and output ------------------------------------------------------------------------------------------
COLUMNS = [  # (metric key, header, format)
    ("reward_mean", "reward ↑", "{:.2f}"),
    ("diversity", "diversity ↑", "{:.3f}"),
    ("prior_fid", "FID to prior ↓", "{:.1f}"),
    ("prior_kid", "KID to prior ↓", "{:.3f}"),
    ("target_tv", "target TV ↓", "{:.3f}"),
    ("target_tv_floor", "TV floor", "{:.3f}"),
    ("target_reward", "target's reward", "{:.2f}"),
]


def mean_std(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def group_by_name(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[result["name"]].append(result)
    return groups


def markdown_table(results: list[dict[str, Any]], pretrained: dict[str, float] | None) -> str:
    groups = group_by_name(results)
    header = ["run", "objective", "β", "seeds", *(h for _, h, _ in COLUMNS), "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if pretrained:
        cells = [mean_std([pretrained.get(key, math.nan)], fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([PRETRAINED_ROW, "–", "–", "–", *cells, "–"]) + " |")
    for name, runs in groups.items():
        cells = [mean_std([r["metrics"].get(key, math.nan) for r in runs], fmt) for key, _, fmt in COLUMNS]
        seconds = mean_std([r["train_seconds"] for r in runs], "{:.0f}")
        row = [name, runs[0]["objective"], f"{runs[0]['beta']:g}", str(len(runs)), *cells, seconds]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_reward_curves(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, runs in group_by_name(results).items():
        curves = [dict(r["reward_curve"]) for r in runs if r["reward_curve"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        low = [min(c[s] for c in curves) for s in steps]
        high = [max(c[s] for c in curves) for s in steps]
        (line,) = axis.plot(steps, mean, label=name)
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training-rollout reward")
    axis.set_title("mean over seeds; band: min–max", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_frontier(results: list[dict[str, Any]], pretrained: dict[str, float] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    if pretrained:
        axis.scatter([pretrained["diversity"]], [pretrained["reward_mean"]], marker="*", s=160, c="k")
        axis.annotate("pretrained", (pretrained["diversity"], pretrained["reward_mean"]), fontsize=8)
        if "target_reward" in pretrained and results:  # E[r] under p^#·exp(β r), β of the first run (evaluated with it)
            axis.axhline(pretrained["target_reward"], color="k", linestyle=":", linewidth=1)
            label = f"target's reward (β = {results[0]['beta']:g})"
            axis.annotate(label, (0.0, pretrained["target_reward"]), fontsize=7, va="bottom")
    for name, runs in group_by_name(results).items():
        diversity = [r["metrics"]["diversity"] for r in runs]
        reward = [r["metrics"]["reward_mean"] for r in runs]
        x, y = statistics.mean(diversity), statistics.mean(reward)
        xerr = statistics.stdev(diversity) if len(runs) > 1 else 0.0
        yerr = statistics.stdev(reward) if len(runs) > 1 else 0.0
        axis.errorbar([x], [y], xerr=[xerr], yerr=[yerr], fmt="o", capsize=3, label=f"{name} (β={runs[0]['beta']:g})")
    axis.set_xlabel("diversity (mean pairwise feature distance) →")
    axis.set_ylabel("reward →")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: list[dict[str, Any]], pretrained: dict[str, float] | None, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, pretrained)
    samples = results[0]["samples"] if results else 0
    text = (
        f"Made by: `{command}`\n\n"
        f"Mean ± std over seeds; each run evaluated on {samples} fresh samples, the pretrained reference from the same "
        f"noise. The pretrained row compares the pretrained sampler with itself under other noise (the floor of FID "
        f"and KID at this sample count). train s: the run's logged wall time of its training steps (rollouts and "
        f"updates).\n\n"
        f"{table}\n"
    )
    (out / "results.md").write_text(text)
    plot_reward_curves(results, out / "reward_vs_step.png")
    plot_frontier(results, pretrained, out / "reward_vs_diversity.png")
    print(text)
    print(f"[compare] wrote {out / 'results.md'}, {out / 'reward_vs_step.png'}, {out / 'reward_vs_diversity.png'}")
