"""``gflowdiff compare`` keys each run by what determines it (issue 18 item 6): the configs' contents, overrides,
steps and seed, so a same-named config or a rerun with more steps never reuses another run."""

from __future__ import annotations

import argparse
from pathlib import Path

from gflowdiff.experiments.compare import run_specs
from gflowdiff.experiments.runs import RunSpec


def specs(out: Path, configs: list[Path], steps: int = 2, variants: tuple[str, ...] = ()) -> list[RunSpec]:
    return run_specs(argparse.Namespace(configs=configs, seeds=[0], steps=steps, variants=list(variants), out=out))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_configs_with_the_same_file_name_get_their_own_runs(tmp_path):
    a = write(tmp_path / "a" / "run.yaml", "model:\n  optimization:\n    train_batch_size: 2\n")
    b = write(tmp_path / "b" / "run.yaml", "model:\n  optimization:\n    train_batch_size: 4\n")
    first, second = specs(tmp_path / "out", [a, b])
    assert first.directory != second.directory
    assert first.name != second.name  # two rows of the table, not one config with two seeds
    assert first.fit_command()[first.fit_command().index("--config") + 1] == str(a)


def test_a_rerun_with_other_steps_or_content_is_another_run(tmp_path):
    config = write(tmp_path / "run.yaml", "model:\n  optimization:\n    train_batch_size: 2\n")
    (short,) = specs(tmp_path / "out", [config], steps=2)
    (longer,) = specs(tmp_path / "out", [config], steps=5)
    assert short.directory != longer.directory and short.done_marker != longer.done_marker
    (again,) = specs(tmp_path / "out", [config], steps=2)
    assert again.directory == short.directory  # the same run: reused
    write(config, "model:\n  optimization:\n    train_batch_size: 3\n")
    (edited,) = specs(tmp_path / "out", [config], steps=2)
    assert edited.directory != short.directory
    plain, variant = specs(tmp_path / "out", [config], variants=("model.seed=3",))
    assert plain.directory != variant.directory
    assert variant.fit_command()[-2:] == ["--model.seed", "3"]
