"""The README's "Using it" commands run as written (the ones that need no downloaded weights), for 2 steps."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from gflowdiff.cli import console_main

REPO = Path(__file__).resolve().parents[2]
DEMO = "configs/digits/residual_nabla_db.yaml"
# Appended to fit/validate so that each runs in seconds: 2 steps, a small value-head warm-up, small evaluations.
SHORT = [
    "--trainer.max_steps", "2",
    "--model.objective.value_warmup_trajectories", "32",
    "--model.objective.value_warmup_epochs", "1",
    "--data.eval_batch_size", "8",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def using_it_commands() -> list[str]:
    """The ``gflowdiff`` lines of the first code block under "## Using it", comments removed."""
    section = README_TEXT.split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("gflowdiff")]


README_TEXT = (REPO / "README.md").read_text()
NEEDS_WEIGHTS = ("configs/sd15/",)


def run_console(argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["gflowdiff", *argv])
    try:
        console_main()
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), f"gflowdiff {shlex.join(argv)} exited with {exit_info.code}"
    return capsys.readouterr().out


def test_readme_using_it_commands_run_as_written(tmp_path, monkeypatch, capsys):
    commands = using_it_commands()
    assert len(commands) >= 10 and any("--ckpt_path last" in c for c in commands)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for command in commands:
        if any(marker in command for marker in NEEDS_WEIGHTS):
            continue
        command, _, redirect = command.partition(" > ")
        argv = shlex.split(command)[1:]
        argv = [DEMO if a == "x.yaml" else a for a in argv]  # the README's placeholder config
        if argv[:1] in (["fit"], ["validate"]) and "--help" not in argv and "--print_config" not in argv:
            argv = [*argv, *SHORT]
        if "last" in argv:  # the resume: one step further than the run it continues
            argv = [*argv, "--trainer.max_steps", "3"]
        output = run_console(argv, monkeypatch, capsys)
        if redirect:
            Path(redirect.strip()).write_text(output)
        ran += 1
    assert ran >= 10
    # what the commands promise: the resumed run continued, validate scored a checkpoint, sample wrote PNGs
    assert len(list(Path("samples").glob("*.png"))) == 2
    assert Path("resolved.yaml").read_text().startswith(("# lightning", "seed_everything"))
    steps = [torch.load(p, weights_only=False)["global_step"] for p in Path("runs").rglob("last.ckpt")]
    assert 3 in steps, steps  # `--ckpt_path last` continued a 2-step run to step 3


@pytest.fixture(autouse=True)
def _quiet_tokenizers(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
