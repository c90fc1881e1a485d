"""gflowdiff's own commands (issue 18, "Noise" and "Unclear errors"): the one-screen overview, the objective and reward
lists."""

from __future__ import annotations

import sys

import pytest

from gflowdiff.cli import console_main, plugin_choices


def run_console(monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", ["gflowdiff", *argv])
    console_main()
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_bare_gflowdiff_and_help_print_the_overview(monkeypatch, capsys, argv):
    out = run_console(monkeypatch, capsys, *argv)
    for expected in ["gflowdiff fit", "gflowdiff sample", "gflowdiff objectives", "gflowdiff rewards",
                     "--model.objective NAME", "--model.pretrained_model", "--model.objective.help NAME"]:  # fmt: skip
        assert expected in out, expected
    assert len(out.splitlines()) < 50  # one screen, not Lightning's 360 Trainer options


@pytest.mark.parametrize(("command", "kind", "example"), [("objectives", "objective", "Residual ∇-DB"),
                                                          ("rewards", "reward", "log Σ_{c ∈ S} p(c | x)")])  # fmt: skip
def test_objectives_and_rewards_are_listed_with_their_summaries(monkeypatch, capsys, command, kind, example):
    out = run_console(monkeypatch, capsys, command)
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == plugin_choices(kind)
    assert example in out
