"""Preemption and exact resume with real processes: SIGTERM, SIGKILL between checkpoints, and a SLURM requeue on a
one-node cluster started on this machine. Each interrupted run must end with the uninterrupted run's weights and
reward curve, bit for bit (CPU, one thread)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "digits" / "residual_nabla_db_paper.yaml"
GFLOWDIFF = [sys.executable, "-m", "gflowdiff.cli"]
MAX_STEPS = 6

pytestmark = pytest.mark.slow


def fit_args(run_dir: Path, max_steps: int = MAX_STEPS) -> list[str]:
    return [
        "fit", "--config", str(CONFIG),
        "--model.sampler.num_inference_steps", "4",
        "--model.objective.init_args.timestep_fraction", "0.5",
        "--model.optimization.train_batch_size", "4",
        "--model.evaluation.log_images_every_n_steps", "0",
        "--data.batch_size", "4",
        "--trainer.max_steps", str(max_steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.every_n_train_steps", "2",
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.version", "0",
        "--trainer.callbacks.init_args.dirpath", str(run_dir / "checkpoints"),
    ]  # fmt: skip


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_fit(run_dir: Path, *extra: str, max_steps: int = MAX_STEPS) -> None:
    subprocess.run(
        [*GFLOWDIFF, *fit_args(run_dir, max_steps), *extra], env=environment(), check=True, cwd=run_dir.parent
    )


def trainable_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def reward_curve(run_dir: Path) -> dict[int, float]:
    """reward/mean by step, over every event file of the run (a resumed run appends a new file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    curve: dict[int, float] = {}
    for events in sorted(run_dir.glob("*/version_0/events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "reward/mean":
                    curve[event.step] = value.tensor.float_val[0] if value.tensor.float_val else value.simple_value
    return curve


def assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    """Same trained tensors and the same reward curve, every point of it (a checkpoint written before its step's log
    carries that step's metrics, and the resumed run logs them)."""
    expected = trainable_tensors(expected_dir / "checkpoints" / "last.ckpt")
    actual = trainable_tensors(actual_dir / "checkpoints" / "last.ckpt")
    assert expected.keys() == actual.keys()
    differing = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not differing, f"{len(differing)} trainable tensors differ, e.g. {differing[:2]}"
    expected_curve, actual_curve = reward_curve(expected_dir), reward_curve(actual_dir)
    assert len(expected_curve) == MAX_STEPS
    assert actual_curve == expected_curve


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def has_checkpoint_for_step(run_dir: Path, step: int) -> bool:
    return any((run_dir / "checkpoints").glob(f"*step={step}*.ckpt"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_dir.mkdir()
    run_fit(run_dir)
    return run_dir


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopped_run_resumes_exactly(uninterrupted, tmp_path, stop_signal):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = subprocess.Popen([*GFLOWDIFF, *fit_args(run_dir)], env=environment(), cwd=tmp_path)
    try:
        wait_for(lambda: has_checkpoint_for_step(run_dir, 2), 600, "the step-2 checkpoint")
        process.send_signal(stop_signal)
        process.wait(timeout=300)
    finally:
        process.kill()
    if stop_signal == signal.SIGTERM:
        assert process.returncode == 0  # a clean stop after writing last.ckpt at a step boundary
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    else:
        # The kill may land anywhere after step=2.ckpt exists; take the worst moment, before last.ckpt is written:
        # only step=2.ckpt is left, and `--ckpt_path last` must still resume from it (not start from scratch).
        for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
            if "step=2" not in checkpoint.name:
                checkpoint.unlink()
    run_fit(run_dir, "--ckpt_path", "last")
    assert_same_run(uninterrupted, run_dir)


def test_corrupt_last_checkpoint_fails_clearly_and_the_previous_one_loads(uninterrupted, tmp_path):
    from gflowdiff.training.checkpointing import SafeCheckpointIO

    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", folder)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut off half-way
    io = SafeCheckpointIO()
    with pytest.raises(RuntimeError, match="truncated, corrupt.*Other checkpoints in that folder: .*step=4"):
        io.load_checkpoint(last)
    previous = next(folder.glob("*step=4*.ckpt"))
    assert io.load_checkpoint(previous)["global_step"] == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a SLURM cluster needs root")
def test_slurm_preemption_requeues_and_finishes_like_the_uninterrupted_run(uninterrupted, tmp_path):
    setup = subprocess.run(["bash", str(REPO / "scripts" / "slurm_localhost.sh")], capture_output=True, text=True)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = tmp_path / "slurm.out"
    job_args = fit_args(run_dir)[1:-6]  # without "fit" and the run folders, which the job script sets itself
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--chdir={tmp_path}",
         str(REPO / "configs" / "slurm" / "cpu_test.sbatch"), *job_args],
        capture_output=True, text=True, check=True,
        env={**environment(), "RUN_DIR": str(run_dir), "GFLOWDIFF_COMMAND": " ".join(GFLOWDIFF)},
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: has_checkpoint_for_step(run_dir, 2), 600, f"job {job} to reach step 2")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what SLURM sends at --signal=SIGUSR1@90
        wait_for(lambda: "finished restart=1" in log.read_text(), 900, f"job {job} to be requeued and finish")
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log.read_text()
    assert "SIGUSR1 received" in text and "requeued SLURM job" in text and "start restart=1" in text, text[-3000:]
    assert_same_run(uninterrupted, run_dir)
