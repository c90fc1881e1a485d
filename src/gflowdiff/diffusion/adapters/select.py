"""Which adapter a model needs: by model_index.json's ``_class_name`` (the diffusers pipeline that saved it), or by
name (``adapter: sdxl`` in YAML) for a folder whose model index says otherwise."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from gflowdiff.diffusion.adapters.base import ModelAdapter
from gflowdiff.diffusion.adapters.stable_diffusion import StableDiffusionAdapter
from gflowdiff.diffusion.adapters.stable_diffusion_3 import StableDiffusion3Adapter
from gflowdiff.diffusion.adapters.stable_diffusion_xl import StableDiffusionXLAdapter
from gflowdiff.diffusion.loading import PRETRAINED_OPTION, load_model_index, resolve_pretrained_path

ADAPTER_OPTION = "--model.adapter"
ADAPTERS: dict[str, type[ModelAdapter]] = {  # the names YAML may give
    "stable_diffusion": StableDiffusionAdapter,
    "stable_diffusion_xl": StableDiffusionXLAdapter,
    "stable_diffusion_3": StableDiffusion3Adapter,
}
PIPELINE_ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.pipeline_class_name: adapter for adapter in ADAPTERS.values()
}


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter called ``name``: a key of :data:`ADAPTERS` or an adapter's class name."""
    by_class = {adapter.__name__: adapter for adapter in ADAPTERS.values()}
    found = ADAPTERS.get(name) or by_class.get(name)
    if found is None:
        raise ValueError(f"{ADAPTER_OPTION}: unknown adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    return found


def model_location(pretrained_model: str | os.PathLike) -> str:
    """``embedded:<name>`` → its folder; a local folder as it is (checked to exist); a hub id passed through."""
    name = str(pretrained_model)
    path = Path(name).expanduser()
    return str(path) if path.is_dir() and not name.startswith("embedded:") else resolve_pretrained_path(name)


def adapter_for(
    model: str | os.PathLike | Mapping, adapter: str | None = None, revision: str | None = None
) -> type[ModelAdapter]:
    """The adapter class for a model: ``model`` is its location (as ``--model.pretrained_model`` takes it) or its
    model_index.json, read already. ``adapter`` (a name) overrides the choice. A model index without
    ``_class_name`` (a bare folder with ``unet/``) is read as Stable Diffusion, as policy.py loads it."""
    if adapter is not None:
        return adapter_class(adapter)
    if isinstance(model, Mapping):
        index, source = model, "model_index.json"
    else:
        source = model_location(model)
        index = load_model_index(source, revision)
    class_name = index.get("_class_name", StableDiffusionAdapter.pipeline_class_name)
    if class_name not in PIPELINE_ADAPTERS:
        raise ValueError(
            f"{PRETRAINED_OPTION} {source}: model_index.json names the pipeline {class_name!r}, which gflowdiff has "
            f"no adapter for; known pipeline classes: {', '.join(sorted(PIPELINE_ADAPTERS))}. Give a model saved by "
            f"one of them, or choose an adapter by name with {ADAPTER_OPTION} ({', '.join(sorted(ADAPTERS))})."
        )
    return PIPELINE_ADAPTERS[class_name]


def load_adapter(
    pretrained_model: str | os.PathLike,
    adapter: str | None = None,
    revision: str | None = None,
    frozen_dtype: torch.dtype = torch.float32,
    offload_text_encoders: bool = False,
    **options,
) -> ModelAdapter:
    """The model loaded by its adapter (:func:`adapter_for`); ``options`` go to the adapter (SD3:
    ``max_sequence_length``)."""
    chosen = adapter_for(pretrained_model, adapter, revision)
    return chosen(str(pretrained_model), revision, frozen_dtype, offload_text_encoders, **options)
