"""An out-of-memory error in a training step keeps its text and names the options that lower the peak."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.cli import main
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.training.memory_hints import out_of_memory_message
from tests.training.test_module import tiny_fit_args


def test_message_lists_the_same_math_options_first_then_those_that_change_the_run():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = out_of_memory_message(
        error, ["--model.objective.init_args.x y (why)"], compiled=False, train_batch_size=4, trajectories=8,
        frozen_dtype="float32",
    )  # fmt: skip
    lines = message.splitlines()
    assert lines[0] == str(error)
    options = [line for line in lines if line.startswith("  - ")]
    assert [option.split()[1] for option in options] == [
        "--model.objective.init_args.x", "--model.performance.compile", "--model.optimization.train_batch_size",
        "--model.frozen_dtype", "--data.batch_size",
    ]  # fmt: skip
    assert "--model.optimization.train_batch_size 2 (now 4" in message and "--data.batch_size 4 (now 8" in message
    assert [option.endswith("[changes the run]") for option in options] == [False] * 3 + [True] * 2


def test_message_leaves_out_options_already_at_their_lowest():
    message = out_of_memory_message(
        RuntimeError("oom"), [], compiled=True, train_batch_size=1, trajectories=1, frozen_dtype="bfloat16"
    )
    assert "--" not in message


def test_gradient_objectives_name_their_structure_and_reward_chunks():
    assert [o.split()[0] for o in ResidualNablaDB(pass_structure="stacked").memory_options()] == [
        "--model.objective.init_args.pass_structure", "--model.objective.init_args.reward_chunk_size",
    ]  # fmt: skip
    assert ResidualNablaDB(pass_structure="fused", reward_chunk_size=1).memory_options() == []


def test_fit_reraises_out_of_memory_with_the_options(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def out_of_memory(self, chunk, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ResidualNablaDB, "loss", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        main(tiny_fit_args(tiny_sd_path, tmp_path))  # the digits config: stacked structure, train_batch_size 4
    message = str(caught.value)
    assert message.startswith("CUDA out of memory (simulated)")
    assert "pass_structure fused (one UNet graph alive at a time; now stacked)" in message
    assert "--model.optimization.train_batch_size 2 (now 4" in message and "--data.batch_size 1 (now 2" in message
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
