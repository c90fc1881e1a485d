"""What a user does by habit must not lose work or silently do something else (issue 18): resume, checkpoints,
run folders, locks. Runs the embedded digits model in-process for a few steps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gflowdiff.cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = REPO / "configs" / "digits" / "residual_nabla_db_paper.yaml"
RUN_NAME = "digits_residual_nabla_db_paper"


def digits_args(root: Path, max_steps: int, *extra: str, subcommand: str = "fit") -> list[str]:
    """The README's digits command, shrunk to seconds, logging under ``root/runs`` (no fixed version)."""
    return [
        subcommand, "--config", str(DIGITS_CONFIG),
        "--model.sampler.num_inference_steps", "4",
        "--model.optimization.train_batch_size", "2",
        "--model.evaluation.log_images_every_n_steps", "0",
        "--data.batch_size", "2",
        "--data.eval_batch_size", "2",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "1000",
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def version_folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs" / RUN_NAME).iterdir() if p.is_dir())


def test_ckpt_path_last_resumes_the_newest_version_of_the_run(tmp_path, monkeypatch):
    """The README's `--ckpt_path last` continues the run at its step 3, in its own version folder."""
    monkeypatch.chdir(tmp_path)
    first = main(digits_args(tmp_path, 3))
    assert first.trainer.global_step == 3 and version_folders(tmp_path) == ["version_0"]

    resumed = main(digits_args(tmp_path, 5, "--ckpt_path", "last"))
    assert resumed.model.rollouts_done == 5  # 3 restored + 2 new, not 5 from scratch
    assert resumed.trainer.global_step == 5
    assert version_folders(tmp_path) == ["version_0"]
    checkpoint = torch.load(
        tmp_path / "runs" / RUN_NAME / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 5
    config = (tmp_path / "runs" / RUN_NAME / "version_0" / "config.yaml").read_text()
    assert "max_steps: 5" in config  # written once the resumed run started
    assert not (tmp_path / "runs" / RUN_NAME / "version_0" / "gflowdiff.lock").exists()  # released at the end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step digits run (``runs/digits_residual_nabla_db_paper/version_0``); tests that write into it copy it."""
    root = tmp_path_factory.mktemp("trained")
    main(digits_args(root, 2))
    return root


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run / "runs", tmp_path / "runs")
    return tmp_path


def last_checkpoint(root: Path) -> Path:
    return root / "runs" / RUN_NAME / "version_0" / "checkpoints" / "last.ckpt"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the run folder and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_command_line_wins_over_the_checkpoint_hyperparameters(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--ckpt_path", str(last_checkpoint(trained_run)), "--trainer.limit_val_batches", "0"]
    extra += ["--model.sampler.num_inference_steps", "2", "--model.evaluation.feature_space", "pixels"]
    cli = main(digits_args(tmp_path, 2, *extra, subcommand="validate"))
    assert cli.model.sampler.num_inference_steps == 2  # the checkpoint says 4
    assert cli.model.evaluation.feature_space == "pixels"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--model.lora.rank", "4"], "--model.lora.rank (checkpoint: 8, now: 4)"),
        (["--model.pretrained_model", "TINY_SD"], "--model.pretrained_model (checkpoint: 'embedded:digits'"),
        (
            ["--config", str(REPO / "configs" / "digits" / "ddpo.yaml")],
            "--model.objective (checkpoint: 'ResidualNablaDB'",
        ),
        (["--model.objective.init_args.use_flow_head", "false"], "flow_head"),
    ],
)
def test_settings_that_cannot_change_on_resume_are_refused_before_writing(
    trained_run, tiny_sd_path, tmp_path, monkeypatch, extra, named
):
    extra = [str(tiny_sd_path) if arg == "TINY_SD" else arg for arg in extra]
    root = copy_run(trained_run, tmp_path)
    monkeypatch.chdir(root)
    before = snapshot(root)
    checkpoint = str(last_checkpoint(root))
    with pytest.raises((ValueError, KeyError)) as error:
        main(digits_args(root, 4, *extra, "--ckpt_path", checkpoint))
    assert named in str(error.value)
    assert snapshot(root) == before


class ResumeFailed(Exception):
    """Stands in for any error while Lightning restores a checkpoint."""


def test_a_failed_resume_leaves_the_run_folder_untouched(trained_run, tmp_path, monkeypatch):
    from gflowdiff.training.module import GFlowDiffModule

    root = copy_run(trained_run, tmp_path)
    monkeypatch.chdir(root)
    before = snapshot(root)

    def fail(self, checkpoint):
        raise ResumeFailed

    monkeypatch.setattr(GFlowDiffModule, "on_load_checkpoint", fail)
    with pytest.raises(ResumeFailed):
        main(digits_args(root, 4, "--model.sampler.guidance_scale", "1.5", "--ckpt_path", "last"))
    after = snapshot(root)
    assert after.keys() >= before.keys()
    assert [name for name in before if after[name] != before[name]] == []  # config.yaml above all


def lock_held_by(path: Path, pid: int, host: str | None = None, slurm_job_id: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "slurm_job_id": slurm_job_id}))


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_live_run_on_the_same_version_folder_is_refused(trained_run, tmp_path, monkeypatch, live_pid):
    from gflowdiff.training.run_lock import LOCK_NAME

    root = copy_run(trained_run, tmp_path)
    monkeypatch.chdir(root)
    lock = root / "runs" / RUN_NAME / "version_0" / LOCK_NAME
    lock_held_by(lock, live_pid)
    before = snapshot(root)
    with pytest.raises(RuntimeError, match=f"in use by pid {live_pid} on {socket.gethostname()}"):
        main(digits_args(root, 4, "--trainer.logger.init_args.version", "0", "--ckpt_path", "last"))
    assert snapshot(root) == before


def test_run_lock_takes_over_stale_locks_and_requeued_jobs_only(tmp_path, monkeypatch, live_pid, dead_pid):
    from gflowdiff.training.run_lock import RunFolderLocked, acquire, read_holder, release

    lock = tmp_path / "version_0" / "gflowdiff.lock"
    lock_held_by(lock, dead_pid)
    with pytest.warns(UserWarning, match=f"process {dead_pid} is no longer running"):
        acquire(lock)
    assert read_holder(lock)["pid"] == os.getpid()
    release(lock)
    assert not lock.exists()

    lock_held_by(lock, live_pid, host="another-node")  # cannot be checked from here: refused
    with pytest.raises(RunFolderLocked, match="if that process is no longer running, delete"):
        acquire(lock)
    lock_held_by(lock, live_pid, host="another-node", slurm_job_id="1234")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")  # the same job, requeued: its previous run is gone
    with pytest.warns(UserWarning, match="SLURM job \\(1234\\), requeued"):
        acquire(lock)
    release(lock)
    assert not lock.exists()


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_without_a_checkpoint_says_it_scores_the_pretrained_model(tmp_path, monkeypatch, subcommand):
    monkeypatch.chdir(tmp_path)
    args = digits_args(tmp_path, 1, "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "0")
    with pytest.warns(UserWarning, match=f"gflowdiff {subcommand}: no --ckpt_path given: scoring the PRETRAINED"):
        main([subcommand, *args[1:]])


def test_a_model_folder_given_by_another_path_is_the_same_model(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    from gflowdiff.training.resume import check_checkpoint_settings

    (tmp_path / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    checkpoint = {"hyper_parameters": {"pretrained_model": str(tmp_path / "models" / "sd")}}
    check_checkpoint_settings(Namespace(pretrained_model="./models/sd"), checkpoint, Path("x.ckpt"))
    with pytest.raises(ValueError, match="--model.pretrained_model"):
        check_checkpoint_settings(Namespace(pretrained_model="embedded:digits"), checkpoint, Path("x.ckpt"))
