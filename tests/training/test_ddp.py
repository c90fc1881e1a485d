"""DDP on CPU (gloo, 2 processes) on the tiny SD pipeline: ranks sample differently and stay in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_module import tiny_fit_args

REPO = Path(__file__).resolve().parents[2]


def fit_two_ranks_and_check(tiny_sd_path, tmp_path, extra_args: list[str]) -> None:
    """Two optimizer steps on 2 CPU ranks: the ranks sample differently and hold identical, changing weights."""
    probe = tmp_path / "probe"
    args = [
        *tiny_fit_args(tiny_sd_path, tmp_path, max_steps=2),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.callbacks+=tests.ddp_probe.RankProbe", f"--trainer.callbacks.directory={probe}",
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "gflowdiff.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for step in (1, 2):
        rank0 = torch.load(probe / f"rank0_step{step}.pt", weights_only=True)
        rank1 = torch.load(probe / f"rank1_step{step}.pt", weights_only=True)
        # Different prompts or noise per rank (the reference seeds every rank identically): different samples.
        assert not torch.equal(rank0["rewards"], rank1["rewards"])
        # One all-reduced update per step: the trainable weights are identical on both ranks.
        assert rank0["state"].keys() == rank1["state"].keys()
        assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    first = torch.load(probe / "rank0_step1.pt", weights_only=True)["state"]
    last = torch.load(probe / "rank0_step2.pt", weights_only=True)["state"]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # and training moved them


@pytest.mark.slow
def test_ddp_ranks_differ_in_samples_and_agree_in_weights(tiny_sd_path, tmp_path):
    fit_two_ranks_and_check(tiny_sd_path, tmp_path, [])


@pytest.mark.skipif(
    not os.environ.get("GFLOWDIFF_LONG_TESTS"), reason="4 min on 2 cores: set GFLOWDIFF_LONG_TESTS=1 to run"
)
def test_ddp_with_compiled_networks(tiny_sd_path, tmp_path):
    """The same check with ``--model.performance.compile true``: DDP's gradient hooks and the compiled UNet, VAE decoder
    and flow head (graph capture and AOTAutograd; ``aot_eager_decomp_partition`` skips code generation on CPU), in the
    fused pass structure (tests/training/test_compilation.py compiles the stacked one)."""
    compile_args = [
        "--model.performance.compile",
        "true",
        "--model.performance.compile_backend",
        "aot_eager_decomp_partition",
    ]
    fit_two_ranks_and_check(
        tiny_sd_path, tmp_path, [*compile_args, "--model.objective.init_args.pass_structure", "fused"]
    )
