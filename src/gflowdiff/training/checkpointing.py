"""What a checkpoint holds: only the trainable state (LoRA, flow head, objective buffers) plus run counters.

The frozen UNet, VAE, text encoder and reward never go into a checkpoint: they are reloaded from
``--model.pretrained_model`` and the reward's own weights. Lightning adds the optimizer, loops and callbacks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from gflowdiff.diffusion.adapters.base import fold_lora_scale
from gflowdiff.diffusion.types import Rollout

if TYPE_CHECKING:
    from gflowdiff.diffusion.policy import DiffusionPolicy

TRAINABLE_STATE_KEY = "gflowdiff"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ANOTHER_MODEL = "was it made with another --model.objective, --model.lora or --model.flow_head?"


class CheckpointedModule(Protocol):
    """What a checkpoint reads from and restores into a :class:`gflowdiff.training.module.GFlowDiffModule` (a
    protocol: the module imports this one, so this one names only what it uses of it)."""

    trainable_names: set[str]
    rollouts_done: int
    skipped_steps: int
    bad_steps_in_a_row: int
    rollout_buffer: Rollout | None
    unlogged_step: dict[str, Any] | None

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def configure_optimizers(self) -> torch.optim.Optimizer: ...


def trainable_state(module: CheckpointedModule) -> dict[str, torch.Tensor]:
    """Trainable parameters and the objective's buffers (e.g. DDPO's per-prompt statistics), by state-dict key."""
    return {
        key: value
        for key, value in module.state_dict().items()
        if key in module.trainable_names or key.startswith("objective.")
    }


def restore_trainable_state(module: CheckpointedModule, checkpoint: dict[str, Any]) -> None:
    """Check the checkpoint has every trainable tensor of this model, then restore the run counters and buffer."""
    state = checkpoint.get("state_dict", {})
    missing = sorted(module.trainable_names - set(state))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} trainable tensors of this model (e.g. {missing[0]!r}); "
                       f"{ANOTHER_MODEL}")  # fmt: skip
    extra = checkpoint.get(TRAINABLE_STATE_KEY, {})
    module.rollouts_done = int(extra.get("rollouts_done", 0))
    module.skipped_steps = int(extra.get("skipped_steps", 0))
    module.bad_steps_in_a_row = int(extra.get("bad_steps_in_a_row", 0))
    buffer = extra.get("rollout_buffer")
    module.rollout_buffer = None if buffer is None else Rollout.from_state(buffer)
    module.unlogged_step = extra.get("unlogged_step")


def check_resumable(module: CheckpointedModule, checkpoint: dict[str, Any], with_optimizer: bool) -> None:
    """Raise before a run starts when ``checkpoint`` cannot be loaded into ``module``: a missing, extra or reshaped
    trainable tensor, or (``with_optimizer``, for ``fit``) other optimizer parameter groups. Lightning would find
    the optimizer mismatch only after the run folder's logs and hparams were written."""
    state = checkpoint.get("state_dict", {})
    own = module.state_dict()
    missing = sorted(module.trainable_names - set(state))
    if missing:
        raise KeyError(f"--ckpt_path: the checkpoint lacks {len(missing)} trainable tensors of this model (e.g. "
                       f"{missing[0]!r}); {ANOTHER_MODEL}")  # fmt: skip
    extra = sorted(key for key in state if key not in own)
    if extra:
        raise KeyError(f"--ckpt_path: the checkpoint holds {len(extra)} tensors this model does not have (e.g. "
                       f"{extra[0]!r}); {ANOTHER_MODEL}")  # fmt: skip
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"--ckpt_path: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint and "
                             f"{tuple(own[key].shape)} in this model; {ANOTHER_MODEL}")  # fmt: skip
    saved_groups = [len(g["params"]) for g in (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups", [])]
    if with_optimizer and saved_groups:
        groups = [len(g["params"]) for g in module.configure_optimizers().param_groups]
        if groups != saved_groups:
            raise ValueError(f"--ckpt_path: the checkpoint's optimizer has parameter groups of {saved_groups} tensors, "
                             f"this model's of {groups}; {ANOTHER_MODEL}")  # fmt: skip


def unlogged_step_metrics(trainer: L.Trainer) -> dict[str, Any] | None:
    """The metrics Lightning is about to log for the training step that is ending, with their logger step; None when
    it logs nothing this step.

    Checkpoints of a step (ModelCheckpoint, PreemptionCheckpoint) are written in ``on_train_batch_end``, before
    Lightning logs that step's metrics, so a kill between the two would lose the step's point: the checkpoint keeps
    it, and the resumed run logs it again (:func:`log_unlogged_step`). Reads two Lightning internals, the same ones
    its own ``update_train_step_metrics`` uses (manual optimization: no accumulation to skip).
    """
    connector = trainer._logger_connector
    if not trainer.loggers or not connector.should_update_logs:
        return None
    metrics = {name: float(value) for name, value in connector.metrics["log"].items()}
    metrics.setdefault("epoch", trainer.current_epoch)  # Lightning adds it to every training-step log
    return {"step": trainer.fit_loop.epoch_loop._batches_that_stepped, "metrics": metrics}


def log_unlogged_step(trainer: L.Trainer, entry: dict[str, Any]) -> None:
    """Log a checkpointed step's metrics at their step. If the killed run had logged them already, the point is
    written twice with the same value."""
    for logger in trainer.loggers:
        logger.log_metrics(entry["metrics"], step=entry["step"])
        logger.save()


def lora_state_with_unit_scale(policy: DiffusionPolicy) -> dict[str, torch.Tensor]:
    """The UNet LoRA's state dict (peft keys) with each layer's ``alpha / rank`` folded into its ``lora_B``.

    diffusers (``load_lora_weights``) and other loaders read a LoRA file without alphas at scale 1 (alpha = rank), so
    the fold makes every loader compute gflowdiff's ΔW = (alpha / rank)·B·A, whatever ``--model.lora.alpha`` is.
    """
    return fold_lora_scale(policy.denoiser, policy.lora_state_dict())


def export_lora(policy: DiffusionPolicy, directory: str | Path) -> Path:
    """Write the denoiser's LoRA in the family's diffusers format (``pytorch_lora_weights.safetensors``, through the
    pipeline class's ``save_lora_weights``): ``pipe.load_lora_weights(dir)`` loads it and reproduces the fine-tuned
    denoiser (the alpha/rank scale is folded into the weights: :func:`lora_state_with_unit_scale`)."""
    # peft's key names, which diffusers' loaders read as they are. convert_state_dict_to_diffusers renames only the
    # attention projections (to_q.lora.down ...), and a file mixing both styles loses the LoRA of the other layers
    # (e.g. the digits config's conv1/conv2) on load. safetensors stores only contiguous tensors; with
    # --model.performance.channels_last, LoRA convolutions are channels-last.
    layers = {key: value.contiguous() for key, value in lora_state_with_unit_scale(policy).items()}
    return policy.adapter.export_lora(layers, directory)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic checkpoint writes and safe, clearly-failing reads.

    Writes go to a temporary file in the same folder, are fsynced, then renamed over the target: a crash during a
    write leaves the previous file intact, never a truncated "last" checkpoint. Reads use ``weights_only=True`` (no
    arbitrary pickle from a file), and a truncated or corrupt file raises an error that names it and lists the other
    checkpoints beside it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fall back to Lightning's transaction-based write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (--ckpt_path)")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as error:
            others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
            # torch's unpickling errors advise weights_only=False, i.e. running arbitrary code from the file: never
            # pass that on (nor chain the error, whose traceback would print it).
            text = str(error).splitlines()[0] if str(error) else ""
            detail = type(error).__name__ + ("" if not text or "weights_only" in text else f": {text}")
            raise RuntimeError(
                f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupt, not a gflowdiff checkpoint, or "
                f"holds objects that are not plain tensors/values ({detail}). Other checkpoints in that folder: "
                f"{', '.join(others) or 'none'}; pass one with --ckpt_path."
            ) from None


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint file was written at, or None if it cannot be read (memory-mapped: cheap)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:
        return None


def newest_checkpoint(folders: list[Path]) -> Path | None:
    """The readable ``*.ckpt`` in ``folders`` written at the highest step (ties: ``last*`` files, then the newest).

    What ``--ckpt_path last`` resumes from. Lightning's own rule takes only ``last*.ckpt`` files, so a run killed
    between writing ``step=N.ckpt`` and ``last.ckpt`` would resume from an older step, or from scratch when no
    ``last.ckpt`` exists yet; unreadable files are skipped with a warning naming them.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    candidates = []
    for path in sorted({p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if p.is_file()}):
        step = checkpoint_step(path)
        if step is None:
            rank_zero_warn(f"--ckpt_path last: skipping {str(path)!r}, which cannot be read (truncated or corrupt)")
            continue
        candidates.append(((step, path.name.startswith("last"), path.stat().st_mtime), path))
    return max(candidates)[1] if candidates else None
