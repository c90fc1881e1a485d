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
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gflowdiff.experiments.runs import RunSpec, config_parts, label_clashing_names


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
