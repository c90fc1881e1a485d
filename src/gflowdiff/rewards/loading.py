"""Loading reward weights from local paths or the Hugging Face Hub, with errors that name the config option.

Every source is either a local path or a hub repository id. Failures are re-raised as :class:`RewardLoadError`
that says which ``--model.reward...`` option was at fault and whether ``HF_HUB_OFFLINE`` restricted the lookup to
the local cache (then a missing file fails in well under a second instead of retrying the network).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gflowdiff.rewards.preprocessing import ImagePreprocess


class RewardLoadError(OSError):
    """A reward's weights, tokenizer or preprocessing config could not be found or read."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _where(source: str) -> str:
    hint = "; HF_HUB_OFFLINE is set, so only local paths and the Hugging Face cache were tried" if hub_offline() else ""
    return f"{source!r} is not a usable local path and could not be loaded as a Hugging Face Hub repo{hint}"


def resolve_file(source: str, filename: str | None, option: str) -> Path:
    """A local file, ``filename`` inside a local folder, or ``filename`` downloaded from the hub repo ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename is not None and (path / filename).is_file():
            return path / filename
        raise RewardLoadError(f"{option}: the folder {source!r} holds no file {filename!r}")
    if filename is None:
        raise RewardLoadError(f"{option}: {source!r} is not a file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=source, filename=filename))
    except Exception as error:  # network, offline cache miss, bad repo id, missing file: all mean "not found"
        raise RewardLoadError(
            f"{option}: {_where(source)} (file {filename!r}): {type(error).__name__}: {error}"
        ) from error


def load_state_dict(path: Path, option: str) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` on CPU; the error names the option."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RewardLoadError(
            f"{option}: {str(path)!r} is not a weights-only PyTorch checkpoint: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise RewardLoadError(f"{option}: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def tensors_only(state: dict[str, Any], option: str) -> dict[str, Tensor]:
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise RewardLoadError(f"{option}: the checkpoint holds no tensors (keys: {sorted(state)[:8]})")
    return tensors


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading a tower out of a bigger checkpoint (we check keys)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def from_pretrained(model_class: Any, source: str, option: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(source)`` in fp32; refuses checkpoints that leave weights uninitialised."""
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except Exception as error:
        raise RewardLoadError(
            f"{option}: {_where(source)} as a {model_class.__name__}: {type(error).__name__}: {error}"
        ) from error
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardLoadError(
            f"{option}: {source!r} has no weights for {len(missing)} parameters of {model_class.__name__} "
            f"(e.g. {missing[:4]}); is it the right kind of model?"
        )
    return model.float()


def load_tokenizer(source: str, option: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise RewardLoadError(f"{option}: {_where(source)} as a tokenizer: {type(error).__name__}: {error}") from error


def _side(value: Any, option: str) -> int:
    """``224``, ``{"shortest_edge": 224}`` or ``{"height": 224, "width": 224}`` → 224."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return int(value["height"])
    raise RewardLoadError(f"{option}: unsupported image size {value!r} in preprocessor_config.json")


def load_clip_preprocess(source: str, option: str) -> ImagePreprocess:
    """The resize / center-crop / normalisation of a CLIP-style ``preprocessor_config.json`` (hub repo or folder)."""
    path = resolve_file(source, "preprocessor_config.json", option)
    try:
        config = json.loads(path.read_text())
        mean, std = config["image_mean"], config["image_std"]
        size = _side(config["size"], option)
        crop = _side(config.get("crop_size", size), option) if config.get("do_center_crop", True) else size
    except (KeyError, ValueError, TypeError) as error:
        raise RewardLoadError(f"{option}: cannot read {str(path)!r}: {type(error).__name__}: {error}") from error
    return ImagePreprocess(size, mean, std, mode="crop", crop_size=crop)
