"""A trained module from a checkpoint file (``gflowdiff sample``, ``gflowdiff compare``, scripts/).

Apart from checkpointing.py, which the module itself imports: this one imports the module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.retired_options import migrate_objective


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
        hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        overrides = {}
        if "objective" in hparams:  # options older checkpoints may hold (training/retired_options.py)
            overrides["objective"] = migrate_objective(hparams["objective"], f"checkpoint {path}")
        module = GFlowDiffModule.load_from_checkpoint(
            path, map_location=map_location, weights_only=True, strict=False, **overrides
        )
    return module.eval()
