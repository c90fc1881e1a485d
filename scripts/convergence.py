"""TV to the exact target against training time and against trajectories sampled, for several digits configs ×
seeds, each trained to the same wall-clock budget (docs/convergence.md shows the last measurement).

    python scripts/convergence.py --configs configs/digits/residual_nabla_db.yaml configs/digits/ddpo.yaml \\
        --seeds 0 1 2 --budget 300 --checkpoint-every 5 --out runs/convergence --jobs 2

Each run is ``gflowdiff fit`` in its own process with ``--trainer.max_time`` = budget, writing a checkpoint every
``--checkpoint-every`` steps; ``--points`` of them, spread over the run's training time, and the last one are then
scored on ``--samples`` fresh samples against one
set of exact target samples (rejection from pretrained samples of independent noise, metrics/target_fidelity.py),
shared by all runs, with the TV floor of that evaluation. The time axis is the run's own logged training time (value
fit, rollouts and updates) summed up to the checkpoint's step: evaluation, checkpoint writing and start-up are not
counted. ``--clock cpu`` (the default) measures it as the process's CPU time (``train/step_cpu_seconds``) and stops
each run when it has used ``--budget`` CPU seconds: at ``--threads 1`` that is the run's wall-clock time on a core of
its own, whatever else runs on the machine; ``--clock wall`` uses wall-clock time (``--trainer.max_time``).
A finished run or evaluation is reused when the command is run again.
Outputs: ``<out>/convergence.json``, ``<out>/convergence.md`` and ``<out>/tv_vs_time.png`` (+ ``tv_vs_trajectories``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback


class CPUTimeBudget(Callback):
    """Stops ``fit`` once the process has used ``seconds`` of CPU time since the fit started (value fit included)."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.process_time() - self.started >= self.seconds:
            trainer.should_stop = True


def run_name(config: str) -> str:
    return "+".join(Path(part).stem for part in config.split("+"))


def train(config: str, seed: int, args: argparse.Namespace) -> Path:
    folder = args.out / run_name(config) / f"seed{seed}"
    done = folder / "done.json"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # Runs train until the budget ends; one whose learning rate decays over --trainer.max_steps keeps its config's
    # max_steps (the schedule's length) and may end earlier.
    optimization = [((yaml.safe_load(Path(part).read_text()).get("model") or {}).get("optimization") or {})
                    for part in config.split("+")]  # fmt: skip
    decays = any(options.get("lr_decay", "none") != "none" for options in optimization)
    command = [
        sys.executable, "-m", "gflowdiff.cli", "fit",
        *[arg for part in config.split("+") for arg in ("--config", part)],
        "--seed_everything", str(seed),
        *([] if decays else ["--trainer.max_steps", "100000"]),
        "--trainer.max_time", max_time(args.budget * (3 if args.clock == "cpu" else 1)),
        "--trainer.logger.init_args.save_dir", str(folder.parent),
        "--trainer.logger.init_args.name", folder.name,
        "--trainer.logger.init_args.version", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "1000000",
        "--model.evaluation.log_images_every_n_steps", "0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", str(args.checkpoint_every),
        "--trainer.callbacks.save_top_k", "-1",
        "--trainer.callbacks.filename", "curve-{step}",
        *(["--trainer.callbacks+=convergence.CPUTimeBudget", "--trainer.callbacks.seconds", str(args.budget)]
          if args.clock == "cpu" else []),
    ]  # fmt: skip
    scripts = str(Path(__file__).resolve().parent)  # CPUTimeBudget's module, for the class_path above
    python_path = os.pathsep.join(p for p in (scripts, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    print(f"[convergence] train {folder}", flush=True)
    with open(folder / "fit.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"gflowdiff fit failed: see {folder / 'fit.log'}")
    done.write_text("{}")
    return folder


def max_time(seconds: int) -> str:
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_seconds(version: Path, clock: str) -> dict[int, float]:
    """Cumulative logged training seconds after each step (a flow-head warm-up before the first step included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    suffix = "cpu_seconds" if clock == "cpu" else "seconds"
    warmup_tag = f"train/warmup_{suffix}"
    warmup = sum(s.value for s in events.Scalars(warmup_tag)) if warmup_tag in tags else 0.0
    total, cumulative = warmup, {0: warmup}
    for scalar in sorted(events.Scalars(f"train/step_{suffix}"), key=lambda s: s.step):
        total += scalar.value
        cumulative[scalar.step + 1] = total  # logged at global_step = steps done − 1
    return cumulative


@torch.no_grad()
def classes_of(module, count: int, seed: int, pretrained: bool, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    from gflowdiff.diffusion.sampling import sample_rollout

    rewards, classes = [], []
    for start in range(0, count, batch):
        prompts = ["a handwritten digit"] * min(batch, count - start)
        generator = torch.Generator().manual_seed(seed + start)
        if pretrained:
            with module.policy.reference():
                rollout = sample_rollout(module.policy, prompts, module.reward, module.sampler, generator)
        else:
            rollout = sample_rollout(module.policy, prompts, module.reward, module.sampler, generator)
        rewards.append(rollout.rewards), classes.append(module.reward.predict_classes(rollout.images))
    return torch.cat(rewards), torch.cat(classes)


def target_pool(module, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Pretrained samples (independent noise) from which the exact target is drawn by rejection; cached."""
    cache = args.out / "target_pool.pt"
    if cache.exists():
        return torch.load(cache)
    print(f"[convergence] {args.pool} pretrained samples for the exact target", flush=True)
    rewards, classes = classes_of(module, args.pool, 10_000_019, pretrained=True)
    pool = {"rewards": rewards, "classes": classes}
    torch.save(pool, cache)
    return pool


def evaluate(folder: Path, args: argparse.Namespace) -> list[dict]:
    from gflowdiff.evaluation.metrics.target_fidelity import target_fidelity
    from gflowdiff.training.loading import load_trained_module

    cache = folder / "convergence.json"
    if cache.exists():
        return json.loads(cache.read_text())
    version = folder / "version_0"
    seconds = step_seconds(version, args.clock)
    saved = {int(p.stem.split("=")[1]): p for p in version.glob("checkpoints/curve-step=*.ckpt")}
    last = version / "checkpoints" / "last.ckpt"
    if last.exists():
        saved[int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])] = last
    saved = {step: path for step, path in saved.items() if seconds.get(step, math.inf) <= args.budget * 1.02}
    total = max((seconds.get(step, 0.0) for step in saved), default=0.0)
    chosen = []  # at most --points checkpoints, spread over the training time, and the last one
    for k in range(1, args.points + 1):
        before = [step for step in saved if seconds.get(step, math.inf) <= total * k / args.points + 1e-6]
        if before and max(before) not in chosen:
            chosen.append(max(before))
    points = []
    for step in sorted(set(chosen)):
        path = saved[step]
        module = load_trained_module(path)
        pool = target_pool(module, args)
        rewards, classes = classes_of(module, args.samples, 12_345, pretrained=False)
        result = target_fidelity(classes, pool["classes"], pool["rewards"], 1.0, module.reward.upper_bound)
        batch = int(yaml.safe_load((version / "config.yaml").read_text())["data"]["batch_size"])
        points.append({
            "step": step,
            "seconds": seconds.get(step, float("nan")),
            "trajectories": step * batch,
            "tv": result["tv"], "tv_floor": result["tv_floor"],
            "p_even": sum(result["tuned_histogram"][0::2]),
            "reward": float(rewards.mean()),
            "histogram": result["tuned_histogram"],
            "target_histogram": result["target_histogram"],
        })  # fmt: skip
        print(f"[convergence] {folder} step {step}: TV {result['tv']:.3f} (floor {result['tv_floor']:.3f})",
              flush=True)  # fmt: skip
    cache.write_text(json.dumps(points))
    return points


def report(curves: dict[str, list[list[dict]]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = ["run", "seeds", "steps in budget", "TV at ¼ budget", "TV at ½", "TV at the end", "best TV",
              "p(even) at end", "seconds to TV ≤ 0.1 (runs)", "floor"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def tv_at(points: list[dict], seconds: float) -> float:
        before = [p for p in points if p["seconds"] <= seconds]
        return before[-1]["tv"] if before else float("nan")

    def fmt(values: list[float]) -> str:
        values = [v for v in values if v == v]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    def seconds_to(points: list[dict], tv: float) -> float:
        reached = [p["seconds"] for p in points if p["tv"] <= tv]
        return reached[0] if reached else float("nan")

    seconds_label = "training seconds (process CPU time)" if args.clock == "cpu" else "training seconds (wall clock)"
    for axis_key, label, filename in (("seconds", seconds_label, "tv_vs_time.png"),
                                      ("trajectories", "trajectories sampled", "tv_vs_trajectories.png")):  # fmt: skip
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for name, runs in curves.items():
            for index, points in enumerate(runs):
                color, legend = f"C{list(curves).index(name)}", name if index == 0 else None
                xs, ys = [p[axis_key] for p in points], [p["tv"] for p in points]
                axis.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.8, label=legend)
        floors = [p["tv_floor"] for runs in curves.values() for points in runs for p in points]
        if floors:
            axis.axhline(statistics.mean(floors), color="k", linestyle=":", linewidth=1)
            axis.annotate("floor (a perfect sampler)", (0, statistics.mean(floors)), fontsize=7, va="bottom")
        axis.set_xlabel(label)
        axis.set_ylabel("TV to the exact target (class histogram)")
        axis.set_ylim(0, None)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(args.out / filename, dpi=120)
        plt.close(figure)
    for name, runs in curves.items():
        ends = [p[-1] for p in runs if p]
        lines.append("| " + " | ".join([
            name, str(len(runs)), fmt([float(e["step"]) for e in ends]).replace(".000", ""),
            fmt([tv_at(p, args.budget / 4) for p in runs]), fmt([tv_at(p, args.budget / 2) for p in runs]),
            fmt([e["tv"] for e in ends]), fmt([min(q["tv"] for q in p) for p in runs if p]),
            fmt([e["p_even"] for e in ends]),
            fmt([seconds_to(p, 0.1) for p in runs]).replace(".000", "")
            + f" ({sum(seconds_to(p, 0.1) == seconds_to(p, 0.1) for p in runs)}/{len(runs)})",
            fmt([e["tv_floor"] for e in ends]),
        ]) + " |")  # fmt: skip
    (args.out / "convergence.md").write_text("\n".join(lines) + "\n")
    (args.out / "convergence.json").write_text(json.dumps(curves))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="fit configs; A.yaml+B.yaml composes two")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=300, help="seconds of training per run (see --clock)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the run's process CPU time; wall: wall-clock time")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--points", type=int, default=6, help="checkpoints evaluated per run, spread over its time")
    parser.add_argument("--samples", type=int, default=512, help="fine-tuned samples per checkpoint")
    parser.add_argument("--pool", type=int, default=8192, help="pretrained samples the exact target is drawn from")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.budget >= 24 * 60 * 60:
        parser.error("--budget must be under a day")
    for part in (p for config in args.configs for p in config.split("+")):
        if not Path(part).is_file():
            parser.error(f"--configs: {part} is not a file")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(config, seed) for config in args.configs for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(pool.map(lambda job: train(*job, args), jobs))
    torch.set_num_threads(max(args.threads * args.jobs, 1))
    curves: dict[str, list[list[dict]]] = {}
    for (config, _), folder in zip(jobs, folders, strict=True):
        curves.setdefault(run_name(config), []).append(evaluate(folder, args))
    report(curves, args)


if __name__ == "__main__":
    main()
