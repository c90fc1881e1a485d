"""The run registry of ``gflowdiff compare``: what determines a run (:func:`run_key`), its name, folder, checkpoint and
``gflowdiff fit`` command (:class:`RunSpec`). Shared by the training half (compare.py) and the report (report.py)."""

from __future__ import annotations

import hashlib
import json
import sys
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
