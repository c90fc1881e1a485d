"""Where a model's components come from: an embedded model, a local diffusers folder or a hub id; its
``model_index.json``; the noise schedule as the DDIM math reads it; checks that name the option on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

EMBEDDED_MODELS = {  # under the gflowdiff package
    "embedded:digits": "zoo/weights/digits",
    "embedded:digits_flow": "zoo/weights/digits_flow",
}
PRETRAINED_OPTION = "--model.pretrained_model"
SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDIMScheduler computes ᾱ from
SUPPORTED_TIMESTEP_SPACINGS = ("leading",)  # math.previous_timesteps: t − T // N
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # math.epsilon_from_model_output
_ANNOUNCED_SCHEDULERS: set[tuple[str, str]] = set()  # (model path, scheduler class) already named in the log


def check_lora_targets(unet: nn.Module, target_modules: list[str]) -> None:
    """Every ``--model.lora.target_modules`` entry must name a Linear/Conv2d layer of the UNet (as peft matches it:
    the end of a module's dotted name)."""
    layers = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    for target in target_modules:
        if not any(name == target or name.endswith(f".{target}") for name in layers):
            suffixes = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else
                               name.rsplit(".", 1)[-1] for name in layers})  # fmt: skip
            raise ValueError(
                f"--model.lora.target_modules: {target!r} matches no layer of the UNet; its Linear/Conv2d layers "
                f"end in: {', '.join(suffixes)}"
            )


def resolve_pretrained_path(name: str) -> str:
    """Map ``embedded:<name>`` to the packaged folder; check that a path-like name exists; pass hub ids through."""
    if name in EMBEDDED_MODELS:
        return str(Path(__file__).parents[1] / EMBEDDED_MODELS[name])
    if name.startswith("embedded:"):
        raise ValueError(f"{PRETRAINED_OPTION}: unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    looks_local = name.startswith(("/", "./", "../", "~")) or os.path.isabs(name) or name.count("/") != 1
    if looks_local or os.path.exists(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{PRETRAINED_OPTION}: model folder {str(path)!r} does not exist")
        if not (path / "unet").is_dir():
            raise FileNotFoundError(
                f"{PRETRAINED_OPTION}: {str(path)!r} is not a diffusers model folder (no unet/ subfolder)"
            )
        return str(path)
    return name


def load_model_index(path: str, revision: str | None) -> dict:
    """model_index.json of a local folder or a hub repo; raises a clear error when the hub cannot be reached."""
    if os.path.isdir(path):
        index_file = Path(path) / "model_index.json"
        return json.loads(index_file.read_text()) if index_file.is_file() else {}
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())
    except Exception as error:  # network, auth, missing repo: all mean "cannot load this model here"
        raise OSError(
            f"{PRETRAINED_OPTION}: could not fetch {path!r} from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Give a local diffusers folder, or check the network / HF_HUB_OFFLINE."
        ) from error


def check_scheduler_config(config: dict, source: str) -> None:
    """Refuse noise schedules that gflowdiff's transition math (math.py, sampling.py) does not handle."""
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and beta_schedule not in SUPPORTED_BETA_SCHEDULES:
        raise ValueError(
            f"{PRETRAINED_OPTION} {source}: scheduler beta_schedule {beta_schedule!r} is not supported; gflowdiff's "
            f"DDIM math takes ᾱ from one of {list(SUPPORTED_BETA_SCHEDULES)} (or trained_betas)."
        )
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SUPPORTED_TIMESTEP_SPACINGS:
        raise ValueError(
            f"{PRETRAINED_OPTION} {source}: scheduler timestep_spacing {spacing!r} is not supported; gflowdiff steps "
            f"from t to t − num_train_timesteps // num_inference_steps, i.e. {list(SUPPORTED_TIMESTEP_SPACINGS)} "
            f"spacing. Set timestep_spacing to 'leading' in {source}'s scheduler config to train with it."
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"{PRETRAINED_OPTION} {source}: scheduler prediction_type {prediction_type!r} is not supported; gflowdiff "
            f"converts the UNet's output to ε̂ for one of {list(SUPPORTED_PREDICTION_TYPES)}."
        )


def load_scheduler(path: str, kwargs: dict):
    """The folder's noise schedule as a DDIMScheduler, whatever class ``scheduler/`` names (SD-1.5 ships PNDM):
    gflowdiff never calls ``scheduler.step``; it samples with its own DDIM η math from the same betas, and says so
    once per model at start-up."""
    from diffusers import DDIMScheduler
    from lightning.pytorch.utilities import rank_zero_info

    config = dict(DDIMScheduler.load_config(path, subfolder="scheduler", **kwargs))
    check_scheduler_config(config, path)
    # The last step goes to ᾱ_0, not to ᾱ = 1, so that it has σ > 0 (a density, as every transition needs) when the
    # folder's scheduler does not say (SDXL ships an Euler scheduler without the key; SD-1.5's PNDM sets it false).
    config.setdefault("set_alpha_to_one", False)
    loaded = config.get("_class_name", "an unnamed scheduler")
    scheduler = DDIMScheduler.from_config(config)
    if (path, loaded) not in _ANNOUNCED_SCHEDULERS:
        _ANNOUNCED_SCHEDULERS.add((path, loaded))
        schedule = "trained_betas" if config.get("trained_betas") is not None else scheduler.config.beta_schedule
        rank_zero_info(
            f"{PRETRAINED_OPTION} {path}: scheduler/ holds {loaded}; gflowdiff samples with its own DDIM η math "
            f"(sampling.py) on the same betas ({schedule}, {scheduler.config.num_train_timesteps} training steps, "
            f"'leading' timesteps), not with {loaded}.step."
        )
    return scheduler


def square_sample_size(sample_size: int | list[int] | tuple[int, ...], path: str) -> int:
    """The UNet's latent side; a non-square ``sample_size`` is refused (gflowdiff samples square latents)."""
    if isinstance(sample_size, int):
        return sample_size
    sides = list(sample_size)
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ValueError(
            f"--model.pretrained_model {path}: unet/config.json has a non-square sample_size {sides}; gflowdiff "
            "samples square latents (sampler, flow heads), so non-square models are not supported"
        )
    return int(sides[0])
