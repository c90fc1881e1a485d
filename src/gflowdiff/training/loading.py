"""A trained module from a checkpoint file (``gflowdiff sample``, ``gflowdiff compare``, scripts/).

Apart from checkpointing.py, which the module itself imports: this one imports the module.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.retired_options import migrate_module_options, migrate_objective


def load_trained_module(path: str | Path, map_location: str = "cpu") -> GFlowDiffModule:
    """Rebuild a GFlowDiffModule from a checkpoint: frozen parts from their sources, trainable state from the file.

    The frozen weights are absent from gflowdiff checkpoints by design, so Lightning's "keys missing from the
    checkpoint" warning is silenced here; a missing *trainable* tensor still raises
    (:func:`gflowdiff.training.checkpointing.restore_trainable_state`).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the checkpoint"
        )
        warnings.filterwarnings("ignore", message="Attribute '(objective|reward)' is an instance of `nn.Module`")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        # options older checkpoints may hold (training/retired_options.py)
        hparams = migrate_module_options(checkpoint.get("hyper_parameters") or {})
        if "objective" in hparams:
            hparams["objective"] = migrate_objective(hparams["objective"], f"checkpoint {path}")
        checkpoint["hyper_parameters"] = hparams
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        module = GFlowDiffModule.load_from_checkpoint(
            buffer, map_location=map_location, weights_only=True, strict=False
        )
    return module.eval()
