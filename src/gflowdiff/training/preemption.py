"""Preemption-safe training: a signal becomes a checkpoint at the next step boundary, then a clean stop (and, on
SLURM, a requeue of the job).

Lightning's own SLURM handler saves its ``hpc_ckpt`` inside the signal handler, i.e. possibly in the middle of a
rollout or between two optimizer steps of one rollout, which a resumed run cannot continue exactly. This callback
only records the signal; the checkpoint is written in ``on_train_batch_end``, where the model, optimizer, data
position and run counters all agree. Use it with ``SLURMEnvironment(auto_requeue=False)`` (the CLI sets that).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

REQUEUE_SIGNALS = {"SIGUSR1"}


class PreemptionCheckpoint(Callback):
    """On SIGUSR1 or SIGTERM: save ``last.ckpt`` at the end of the current step and stop; on SIGUSR1 under SLURM,
    also ``scontrol requeue`` the job, which then resumes with ``--ckpt_path last``.

    Args:
        signals: signals to handle (names from the ``signal`` module).
        requeue: requeue the SLURM job after the checkpoint when the signal is SIGUSR1 (the ``--signal`` warning).
    """

    def __init__(self, signals: list[str] = ["SIGUSR1", "SIGTERM"], requeue: bool = True):  # noqa: B006
        super().__init__()
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, _frame) -> None:
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning's own handlers (registered when fit starts), so these take precedence.
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        received = trainer.strategy.broadcast(self.received)  # rank 0 decides, so every rank stops at the same step
        if received is None:
            return
        path = self.checkpoint_path(trainer)
        rank_zero_info(f"{received} received: saving {path} at step {trainer.global_step} and stopping")
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        job_id = os.environ.get("SLURM_JOB_ID")
        if self.requeue and received in REQUEUE_SIGNALS and job_id and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                rank_zero_warn(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
            else:
                rank_zero_info(f"requeued SLURM job {job_id}")

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> str:
        """The ``last`` file of the run's ModelCheckpoint (what ``--ckpt_path last`` resumes from)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return str(Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
        return str(Path(trainer.default_root_dir) / "last.ckpt")
