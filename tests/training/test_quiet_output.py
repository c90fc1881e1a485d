"""What `gflowdiff fit` prints (issue 18, "Noise"): none of the known harmless warnings of Lightning and transformers,
and a progress bar counting optimizer steps against max_steps. Other warnings still print."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from lightning.fabric.utilities.warnings import PossibleUserWarning

from gflowdiff.training.quiet import silence_known_messages

REPO = Path(__file__).resolve().parents[2]
KNOWN_NOISE = [
    "litlogger",
    "LeafSpec",
    "module(s) in eval mode",
    "requires torchvision",
    "`srun` command is available",
    "manual optimization",
    "saved_models",
    "Epoch 0/-2",
]


def fake_srun(root: Path) -> str:
    """A PATH with an ``srun`` on it, as on a SLURM login node (Lightning then prints its hint)."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_fit_prints_no_known_noise_and_a_step_progress_bar(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": fake_srun(tmp_path)}
    env.pop("SLURM_JOB_ID", None)
    command = [
        sys.executable, "-m", "gflowdiff.cli", "fit",
        "--config", str(REPO / "configs/digits/residual_nabla_db_paper.yaml"),
        "--model.sampler.num_inference_steps", "4", "--model.optimization.train_batch_size", "2",
        "--model.evaluation.log_images_every_n_steps", "0", "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
        "--trainer.callbacks.init_args.every_n_train_steps", "1",  # the first periodic checkpoint comes at step 1
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert [noise for noise in KNOWN_NOISE if noise in output] == [], output
    assert "Training: 100%" in output and "2/2" in output, output


def test_only_the_known_messages_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_messages()
        warnings.warn(
            "Found 262 module(s) in eval mode at the start of training. This may ...", PossibleUserWarning, stacklevel=1
        )
        warnings.warn("Found 3 NaN rewards", PossibleUserWarning, stacklevel=1)
        warnings.warn(
            "Using ModelCheckpoint with manual optimization and every_n_train_steps, but ...", UserWarning, stacklevel=1
        )
    assert [str(w.message) for w in caught] == ["Found 3 NaN rewards"]
