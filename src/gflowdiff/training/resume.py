"""How a new process joins a run: where ``--ckpt_path last`` looks, and what a checkpoint lets the command line change.

Read from the parsed config, before any class is built, so that a resume that cannot work fails before the model
loads and before anything of the run is written.

- ``--ckpt_path last`` takes the newest readable checkpoint of the run: the ``dirpath`` of its ModelCheckpoint, else
  every ``version_*/checkpoints`` folder of the logger's ``save_dir/name``. ``fit`` then logs into the version folder
  that checkpoint came from (unless the logger's version is fixed), instead of opening ``version_N+1``.
- With a checkpoint, what the user passes (``--config`` and the command line) wins; the checkpoint's own
  hyperparameters only serve to name the settings that differ. Settings that define the trained tensors
  (:data:`FROZEN_SETTINGS`) cannot change on resume: a clear error names them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from gflowdiff.training.checkpointing import newest_checkpoint
from gflowdiff.training.retired_options import migrate_module_options

# The model settings a checkpoint's trainable tensors are made for (dotted keys under ``model``).
FROZEN_SETTINGS = ("pretrained_model", "revision", "objective.class_path", "lora.rank", "lora.alpha",
                   "lora.target_modules")  # fmt: skip
DEFAULT_LOGGER_NAME = "lightning_logs"  # Lightning's default TensorBoardLogger/CSVLogger name


def import_class(class_path: str) -> type | None:
    """The class named by a config's ``class_path``, or None when it cannot be imported."""
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def as_list(value: Any) -> list:
    return [] if value is None or isinstance(value, bool) else list(value) if isinstance(value, list) else [value]


def checkpoint_callbacks(trainer: Namespace) -> list[Namespace]:
    """The ModelCheckpoint entries of ``trainer.callbacks`` (subclasses too)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    entries = [c for c in as_list(trainer.get("callbacks")) if isinstance(c, Namespace) and c.get("class_path")]
    return [c for c in entries if issubclass(import_class(c.class_path) or object, ModelCheckpoint)]


def versioned_logger(trainer: Namespace) -> Namespace | None:
    """The first logger's ``init_args`` when it keeps ``save_dir/name/version_N`` folders (TensorBoard, CSV)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = as_list(trainer.get("logger"))
    if not loggers or not isinstance(loggers[0], Namespace) or not loggers[0].get("class_path"):
        return None
    cls = import_class(loggers[0].class_path)
    if cls is None or not issubclass(cls, (TensorBoardLogger, CSVLogger)):
        return None
    return loggers[0].init_args


def run_root(trainer: Namespace) -> tuple[Path, Namespace | None] | None:
    """The folder holding the run's ``version_*`` folders and the logger ``init_args`` that name it (None for
    Lightning's default logger); None when the run has no such folder (no logger, or one without versions)."""
    default_root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = trainer.get("logger")
    if logger is None or logger is True:
        return default_root / DEFAULT_LOGGER_NAME, None
    init_args = versioned_logger(trainer)
    if init_args is None:
        return None
    save_dir = Path(init_args.get("save_dir") or default_root)
    name = init_args.get("name")
    return (save_dir / name if name else save_dir), init_args


def version_folder_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def resume_folders(trainer: Namespace) -> tuple[list[Path], Path | None]:
    """The checkpoint folders ``--ckpt_path last`` searches, and the run root whose ``version_*`` folders are among
    them (None when the logger's version is fixed or checkpoints go to a ``dirpath``)."""
    callbacks = checkpoint_callbacks(trainer)
    folders = [Path(c.init_args.dirpath) for c in callbacks if c.init_args.get("dirpath")]
    if folders and len(folders) == len(callbacks):
        return folders, None
    root = run_root(trainer)
    if root is None:
        return folders + [Path(trainer.get("default_root_dir") or os.getcwd()) / "checkpoints"], None
    root_dir, init_args = root
    version = None if init_args is None else init_args.get("version")
    if version is not None:
        return folders + [root_dir / version_folder_name(version) / "checkpoints"], None
    versions = sorted(root_dir.glob("*/checkpoints")) if root_dir.is_dir() else []
    return folders + versions, root_dir


def resolve_last_checkpoint(config: Namespace, subcommand: str) -> Path | None:
    """Replace ``ckpt_path: last`` by the newest readable checkpoint of the run (None: start fresh). For ``fit``, the
    logger then continues in that checkpoint's version folder."""
    trainer = config.trainer
    folders, root_dir = resume_folders(trainer)
    newest = newest_checkpoint(folders)
    if newest is None:
        searched = ", ".join(map(str, folders)) if folders else f"{root_dir}/*/checkpoints"
        rank_zero_info(f"--ckpt_path last: no checkpoint in {searched}; starting fresh")
        return None
    rank_zero_info(f"--ckpt_path last: resuming from {newest}")
    init_args = versioned_logger(trainer)
    in_version_folder = root_dir is not None and newest.parent.parent.parent == root_dir
    if subcommand == "fit" and in_version_folder and init_args is not None:
        init_args.version = newest.parent.parent.name  # log into the run's folder, not a new version_N+1
    return newest


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/Namespaces → ``{"a.b.c": leaf}``."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def short(value: Any) -> Any:
    """A class path by its class name (``gflowdiff.objectives.DDPO`` → ``DDPO``) for messages."""
    return value.rsplit(".", 1)[-1] if isinstance(value, str) and value.startswith("gflowdiff.") else value


def option(key: str) -> str:
    """``objective.class_path`` → ``--model.objective``; ``lora.rank`` → ``--model.lora.rank``."""
    key = key.removesuffix(".class_path").replace(".init_args.", ".")
    return f"--model.{key}"


def comparable(key: str, value: Any) -> Any:
    """A model folder by its real path, so ``./models/sd`` and ``/abs/models/sd`` are the same model."""
    if key == "pretrained_model" and isinstance(value, str) and os.path.isdir(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value


def changed_settings(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> list[str]:
    return [
        f"{option(key)} (checkpoint: {short(saved[key])!r}, now: {short(current.get(key))!r})"
        for key in keys
        if key in saved and comparable(key, saved[key]) != comparable(key, current.get(key))
    ]


def check_checkpoint_settings(model_config: Namespace, checkpoint: dict[str, Any], path: Path) -> None:
    """Raise when the checkpoint was made with other :data:`FROZEN_SETTINGS`; name the other settings that differ
    (the user's values are used)."""
    hparams = migrate_module_options(checkpoint.get("hyper_parameters") or {})  # older checkpoints' flat options
    hparams.pop("_instantiator", None)
    if not hparams:
        return
    saved, current = flatten(hparams), flatten(model_config)
    frozen = changed_settings(saved, current, FROZEN_SETTINGS)
    if frozen:
        raise ValueError(
            f"--ckpt_path {str(path)!r} was trained with other settings that cannot change on resume: "
            f"{'; '.join(frozen)}. Use the checkpoint's values, or train a new run without --ckpt_path."
        )
    others = [key for key in saved if key not in FROZEN_SETTINGS]
    differing = changed_settings(saved, current, others)
    if differing:
        rank_zero_info(
            f"--ckpt_path {path.name}: using the given settings, which differ from the checkpoint's: "
            + "; ".join(differing)
        )
