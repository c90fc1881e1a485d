"""gflowdiff's own commands (issue 18, "Noise" and "Unclear errors"): the one-screen overview, the objective and reward
lists, and ``gflowdiff sample``, which replaces the ``predict`` that failed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gflowdiff.cli import GFlowDiffCLI, console_main, main
from gflowdiff.overview import plugin_choices
from gflowdiff.sample_images import load_policy, parse_args
from gflowdiff.sample_images import main as sample_main
from tests.training.test_run_safety import digits_args, last_checkpoint


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


def test_predict_is_gone_and_points_to_sample(monkeypatch, capsys):
    assert "predict" not in GFlowDiffCLI.subcommands()
    monkeypatch.setattr(sys, "argv", ["gflowdiff", "predict", "--ckpt_path", "x.ckpt"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    assert "gflowdiff sample" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_step_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sampled_run")
    main(digits_args(root, 2))
    return last_checkpoint(root)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_writes_a_png_per_prompt_and_seed(two_step_checkpoint, tmp_path):
    common = ["--ckpt_path", str(two_step_checkpoint), "--prompts", "3", "an even digit", "--num_inference_steps", "4"]
    paths = sample_main([*common, "--seeds", "0", "1", "--out", str(tmp_path / "a")])
    assert [p.name for p in paths] == ["00_3_seed0.png", "00_3_seed1.png",
                                       "01_an_even_digit_seed0.png", "01_an_even_digit_seed1.png"]  # fmt: skip
    images = {p.name: Image.open(p) for p in paths}
    assert all(image.size == (8, 8) and image.mode == "L" for image in images.values())  # the digits model: 8×8 grey
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))  # two seeds, two samples
    again = sample_main([*common, "--seeds", "0", "--out", str(tmp_path / "b")])  # seed 0 alone reproduces it
    assert np.array_equal(pixels(again[0]), pixels(paths[0]))
    assert np.array_equal(pixels(again[1]), pixels(paths[2]))


def test_sample_loads_the_checkpoints_lora(two_step_checkpoint):
    policy, sampler = load_policy(parse_args(["--ckpt_path", str(two_step_checkpoint), "--prompts", "3"]))
    lora_b = [p for name, p in policy.unet.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained, not the zero-initialised B
    assert sampler.num_inference_steps == 4  # the run's sampler, from the checkpoint


def test_sample_without_a_checkpoint_says_it_samples_the_pretrained_model(tmp_path, capsys):
    paths = sample_main(["--prompts", "3", "--seeds", "0", "--num_inference_steps", "2", "--out", str(tmp_path)])
    assert len(paths) == 1 and paths[0].is_file()
    assert "sampling the PRETRAINED model 'embedded:digits'" in capsys.readouterr().err
    policy, _ = load_policy(parse_args(["--prompts", "3"]))
    assert all(torch.count_nonzero(p) == 0 for name, p in policy.unet.named_parameters() if "lora_B" in name)
