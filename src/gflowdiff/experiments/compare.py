"""``gflowdiff compare``: train a list of configs × seeds, evaluate each run the same way, write a table and plots.

    gflowdiff compare --configs configs/digits/*.yaml --seeds 0 1 2 --steps 100 --out runs/compare

A config may be a ``+``-joined composition ``A.yaml+B.yaml`` (``--config A.yaml --config B.yaml``), e.g. a base
config plus a small override file. Each run is ``gflowdiff fit`` in its own process, in ``<out>/<name>/seed<S>-<key>``:
the key hashes the configs' contents, the overrides, the steps and the seed, so an edited config, another config of
the same file name or more ``--steps`` is a new run.
A run whose ``done.json`` exists is reused, an interrupted one resumes from its ``last.ckpt``, and an evaluation whose
``metrics.json`` exists is reused: re-running the command only computes what is missing. ``--set KEY=VALUE`` adds a
variant of every config (e.g. ``--set model.objective.init_args.reward_scale=2``); the variant's name carries it.
Outputs: ``<out>/results.md`` (mean ± std over seeds), ``<out>/reward_vs_step.png``, ``<out>/reward_vs_diversity.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path


def config_parts(config: Path) -> list[Path]:
    return [Path(part) for part in str(config).split("+")]


def run_key(config: Path, overrides: tuple[str, ...], steps: int, seed: int) -> str:
    """A short hash of what determines a run: the contents of its config files (in order), its overrides, steps and
    seed. Two configs with the same file name, an edited config or more ``--steps`` each get their own run."""
    digest = hashlib.sha256()
    for part in config_parts(config):
        digest.update(part.read_bytes() + b"\0")
    digest.update(json.dumps({"overrides": list(overrides), "steps": steps, "seed": seed}).encode())
    return digest.hexdigest()[:10]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison. ``label`` names it in the table when the configs' file names clash."""

    config: Path
    seed: int
    overrides: tuple[str, ...]
    out: Path
    steps: int
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.base_name

    @property
    def base_name(self) -> str:
        tags = [o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in self.overrides]
        return "__".join(["+".join(part.stem for part in config_parts(self.config)), *tags])

    @cached_property
    def key(self) -> str:
        return run_key(self.config, self.overrides, self.steps, self.seed)

    @property
    def directory(self) -> Path:
        """``<out>/<name>/seed<S>-<key>``: the key keeps runs of other contents or steps apart."""
        return self.out / self.name / self.run_folder_name

    @property
    def run_folder_name(self) -> str:
        return f"seed{self.seed}-{self.key}"

    @property
    def version(self) -> Path:
        return self.directory / "version_0"

    @property
    def last_checkpoint(self) -> Path:
        return self.version / "checkpoints" / "last.ckpt"

    @property
    def done_marker(self) -> Path:
        return self.directory / "done.json"

    def fit_command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "gflowdiff.cli",
            "fit",
            *[arg for part in config_parts(self.config) for arg in ("--config", str(part))],
            "--seed_everything",
            str(self.seed),
            "--trainer.max_steps",
            str(self.steps),
            "--trainer.logger.init_args.save_dir",
            str(self.out / self.name),
            "--trainer.logger.init_args.name",
            self.run_folder_name,
            "--trainer.logger.init_args.version",
            "0",
            "--trainer.enable_progress_bar",
            "false",
        ]
        for override in self.overrides:
            key, value = override.split("=", 1)
            command += [f"--{key}", value]
        if self.last_checkpoint.exists():  # an interrupted run resumes where it stopped
            command += ["--ckpt_path", str(self.last_checkpoint)]
        return command


def train(spec: RunSpec, threads: int) -> None:
    if spec.done_marker.exists():
        print(f"[compare] reuse  {spec.name} seed {spec.seed}", flush=True)
        return
    spec.directory.mkdir(parents=True, exist_ok=True)
    print(f"[compare] train  {spec.name} seed {spec.seed}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    with open(spec.directory / "fit.log", "a") as log:
        result = subprocess.run(spec.fit_command(), stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"gflowdiff fit failed for {spec.name} seed {spec.seed}: see {spec.directory / 'fit.log'}")
    spec.done_marker.write_text(json.dumps({"seconds": time.time() - started, "steps": spec.steps}))
    print(f"[compare] done   {spec.name} seed {spec.seed} ({time.time() - started:.0f} s)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gflowdiff compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path, required=True, help="fit configs (YAML)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (--trainer.max_steps)")
    parser.add_argument("--set", dest="variants", action="append", default=[], metavar="KEY=VALUE",
                        help="add a variant of every config with this override (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--samples", type=int, default=512, help="fresh samples per run for the metrics")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--train-only", action="store_true", help="stop after training")
    args = parser.parse_args(argv)
    for path in [part for config in args.configs for part in config_parts(config)]:
        if not path.is_file():
            parser.error(f"--configs: {path} is not a file")
    for variant in args.variants:
        if "=" not in variant:
            parser.error(f"--set expects KEY=VALUE, got {variant!r}")
    return args


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    override_sets = [()] + [(variant,) for variant in args.variants]
    specs = [
        RunSpec(config, seed, overrides, args.out, args.steps)
        for config in args.configs
        for overrides in override_sets
        for seed in args.seeds
    ]
    return label_clashing_names(specs)


def label_clashing_names(specs: list[RunSpec]) -> list[RunSpec]:
    """Configs whose file names give the same run name but whose contents differ get the name plus their content
    key (``run@1a2b3c``), so the table shows them apart instead of as seeds of one config."""
    contents: dict[str, set[str]] = {}
    for spec in specs:
        contents.setdefault(spec.base_name, set()).add(run_key(spec.config, spec.overrides, 0, 0))
    return [
        replace(spec, label=f"{spec.base_name}@{run_key(spec.config, spec.overrides, 0, 0)[:6]}")
        if len(contents[spec.base_name]) > 1
        else spec
        for spec in specs
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    specs = run_specs(args)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda spec: train(spec, args.threads), specs))
    if args.train_only:
        return
    from gflowdiff.experiments.report import evaluate_runs, write_report

    results, pretrained = evaluate_runs(specs, args.samples)
    write_report(results, pretrained, args.out, command=" ".join(["gflowdiff compare", *(argv or sys.argv[2:])]))


if __name__ == "__main__":
    main(sys.argv[1:])
