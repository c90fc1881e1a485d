"""One live process per run folder: a lock file in the version folder with its holder's pid, host and SLURM job.

Two runs writing the same folder (the fixed ``--trainer.logger.init_args.version`` of the SLURM scripts, or a
second ``--ckpt_path last``) would interleave event files and overwrite each other's checkpoints and LoRA. The
second is refused, naming the holder. A lock whose holder is gone is taken over: a dead pid on this host, or the
same SLURM job (a requeued job resumes in the folder its previous run held). A holder on another host cannot be
checked from here: the message says how to remove its lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

LOCK_NAME = "gflowdiff.lock"


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder."""


def this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder, or None when the file is gone or unreadable (e.g. cut off by a crash)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_reason(holder: dict[str, Any] | None) -> str | None:
    """Why the lock can be taken over, or None when its holder may still be running."""
    me = this_process()
    if holder is None:
        return "its lock file is unreadable"
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it is this SLURM job ({me['slurm_job_id']}), requeued"
    if holder.get("host") == me["host"]:
        if holder.get("pid") == me["pid"]:
            return "this process held it"
        if not pid_alive(int(holder.get("pid", -1))):
            return f"process {holder.get('pid')} is no longer running"
    return None


def acquire(path: Path) -> None:
    """Create the lock (atomically), taking over a stale one; raise :class:`RunFolderLocked` for a live holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            reason = stale_reason(holder)
            if reason is None:
                raise RunFolderLocked(locked_message(path, holder)) from None
            rank_zero_warn(f"taking over the run lock {str(path)!r} of {describe(holder)}: {reason}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as file:
            json.dump(this_process(), file)
        return


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = read_holder(path)
    me = this_process()
    if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
        path.unlink(missing_ok=True)


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unknown process"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def locked_message(path: Path, holder: dict[str, Any] | None) -> str:
    return (
        f"the run folder {str(path.parent)!r} is in use by {describe(holder)}: a second run there would overwrite its "
        f"checkpoints and logs. Give this run its own folder (--trainer.logger.init_args.version, "
        f"--trainer.callbacks.init_args.dirpath), or, if that process is no longer running, delete {str(path)!r}."
    )


RANK_VARIABLES = ("SLURM_PROCID", "RANK", "LOCAL_RANK", "NODE_RANK")  # SLURM, torchrun, Lightning's DDP launcher


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher numbered it (a plain ``gflowdiff fit`` is). Read from
    the environment: the lock is taken before ``fit`` sets up the processes, so before any logger file exists."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


@contextmanager
def run_folder_lock(trainer: L.Trainer) -> Iterator[None]:
    """Hold :data:`LOCK_NAME` in the trainer's log folder while the block runs (rank 0 only)."""
    if not is_launch_rank_zero() or not trainer.log_dir:
        yield
        return
    path = Path(trainer.log_dir) / LOCK_NAME
    acquire(path)
    try:
        yield
    finally:
        release(path)
