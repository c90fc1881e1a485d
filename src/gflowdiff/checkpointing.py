"""What a checkpoint holds: only the trainable state (LoRA, flow head, objective buffers) plus run counters.

The frozen UNet, VAE, text encoder and reward never go into a checkpoint: they are reloaded from
``--model.pretrained_model`` and the reward's own weights. Lightning adds the optimizer, loops and callbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gflowdiff.types import Rollout

if TYPE_CHECKING:
    from gflowdiff.module import GFlowDiffModule
    from gflowdiff.policy import DiffusionPolicy

TRAINABLE_STATE_KEY = "gflowdiff"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def trainable_state(module: GFlowDiffModule) -> dict[str, torch.Tensor]:
    """Trainable parameters and the objective's buffers (e.g. DDPO's per-prompt statistics), by state-dict key."""
    return {
        key: value
        for key, value in module.state_dict().items()
        if key in module.trainable_names or key.startswith("objective.")
    }


def restore_trainable_state(module: GFlowDiffModule, checkpoint: dict[str, Any]) -> None:
    """Check the checkpoint has every trainable tensor of this model, then restore the run counters and buffer."""
    state = checkpoint.get("state_dict", {})
    missing = sorted(module.trainable_names - set(state))
    if missing:
        raise KeyError(
            f"the checkpoint lacks {len(missing)} trainable tensors of this model (e.g. {missing[0]!r}); was it made "
            f"with another --model.objective, --model.lora or --model.flow_head?"
        )
    extra = checkpoint.get(TRAINABLE_STATE_KEY, {})
    module.rollouts_done = int(extra.get("rollouts_done", 0))
    buffer = extra.get("rollout_buffer")
    module.rollout_buffer = None if buffer is None else Rollout.from_state(buffer)


def export_lora(policy: DiffusionPolicy, directory: str | Path) -> Path:
    """Write the UNet LoRA in diffusers format (``pytorch_lora_weights.safetensors``): ``pipe.load_lora_weights``
    and ``unet.load_lora_adapter(dir, weight_name=...)`` load it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(policy.lora_state_dict())
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME
