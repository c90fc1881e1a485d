"""The LAION aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (docs/method.md §4.4)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.loading import (
    RewardLoadError,
    from_pretrained,
    load_clip_preprocess,
    load_state_dict,
    resolve_file,
    tensors_only,
)
from gflowdiff.rewards.preprocessing import check_unit_range

#: Linear layers of the LAION head at these indices of ``layers``; dropout sits at 1, 3, 5 (no activations).
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


class LaionMLPHead(nn.Module):
    """``layers`` = Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
    Linear(16, 1): the head of LAION's improved aesthetic predictor, reused by ImageReward. It has no
    nonlinearity, so it is an affine map; dropout is inactive in eval mode."""

    def __init__(self, input_dim: int):
        super().__init__()
        modules: list[nn.Module] = []
        width = input_dim
        for index in range(8):
            if index in HEAD_DROPOUT:
                modules.append(nn.Dropout(HEAD_DROPOUT[index]))
            else:
                out = HEAD_WIDTHS[HEAD_LINEAR_INDICES.index(index)]
                modules.append(nn.Linear(width, out))
                width = out
        self.layers = nn.Sequential(*modules)
        self.input_dim = input_dim

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def head_from_state_dict(state: dict[str, Any], option: str, prefix: str = "") -> LaionMLPHead:
    """Build a :class:`LaionMLPHead` from ``layers.{0,2,4,6,7}.{weight,bias}`` (after ``prefix``); strict."""
    tensors = {
        key[len(prefix) :]: value for key, value in tensors_only(state, option).items() if key.startswith(prefix)
    }
    expected = {f"layers.{i}.{name}" for i in HEAD_LINEAR_INDICES for name in ("weight", "bias")}
    if set(tensors) != expected:
        raise RewardLoadError(
            f"{option}: not a LAION MLP head: expected keys {sorted(expected)}, "
            f"missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)[:8]}"
        )
    head = LaionMLPHead(int(tensors["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict({key: value.float() for key, value in tensors.items()})
    except RuntimeError as error:  # a layer of the wrong width
        raise RewardLoadError(f"{option}: the MLP head's shapes do not match 1024→128→64→16→1: {error}") from error
    return head


def load_aesthetic_head(path: str, option: str = "--model.reward.head_path") -> LaionMLPHead:
    """The LAION head from a local ``.pth`` state dict (``sac+logos+ava1-l14-linearMSE.pth``)."""
    return head_from_state_dict(load_state_dict(resolve_file(path, None, option), option), option)


def load_clip_vision(source: str, option: str) -> nn.Module:
    """The vision tower and projection of a CLIP checkpoint (a full ``CLIPModel`` or a vision-only one)."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        raise RewardLoadError(
            f"{option}: {source!r} is not a usable local folder or Hugging Face Hub repo of a CLIP model: "
            f"{type(error).__name__}: {error}"
        ) from error
    if config.model_type == "clip":
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim  # stored on the top-level config of a CLIPModel
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise RewardLoadError(f"{option}: {source!r} is a {config.model_type!r} model, not CLIP")
    return from_pretrained(CLIPVisionModelWithProjection, source, option, config=vision_config)


class AestheticReward(Reward):
    """LAION aesthetic score (about 5–8 for SD-1.5 samples): the "improved aesthetic predictor" MLP on the
    L2-normalised CLIP ViT-L/14 image embedding. The prompt is ignored.

    Images are resized (shorter side, bicubic, antialiased) and center-cropped to the CLIP input size, then
    normalised with the CLIP checkpoint's mean/std (its ``preprocessor_config.json``); all of it differentiable.

    Args:
        clip_model: hub id or local folder of the CLIP image encoder (a transformers ``CLIPModel`` checkpoint with
            its ``preprocessor_config.json``). Its projection dimension must match the head's input (768).
        head_path: local file of the MLP head's state dict (``sac+logos+ava1-l14-linearMSE.pth``); when set,
            ``head_repo`` and ``head_filename`` are ignored.
        head_repo: hub repo holding the head (TRL's mirror of the LAION file).
        head_filename: file name of the head in ``head_repo``.
    """

    differentiable = True
    uses_prompt = False

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head_path: str | None = None,
        head_repo: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
    ):
        super().__init__()
        if head_path is not None:  # the small file first, so that a typo fails before CLIP is read
            self.head = load_aesthetic_head(head_path, "--model.reward.head_path")
        else:
            option = "--model.reward.head_repo"
            self.head = head_from_state_dict(
                load_state_dict(resolve_file(head_repo, head_filename, option), option), option
            )
        self.preprocess = load_clip_preprocess(clip_model, "--model.reward.clip_model")
        self.clip = load_clip_vision(clip_model, "--model.reward.clip_model")
        projection_dim = self.clip.config.projection_dim
        if projection_dim != self.head.input_dim:
            raise ValueError(
                f"--model.reward.clip_model {clip_model!r} gives {projection_dim}-d image embeddings but the aesthetic "
                f"head expects {self.head.input_dim}-d ones (the LAION head is for CLIP ViT-L/14)"
            )
        self.freeze()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, D) L2-normalised CLIP image embeddings."""
        outputs = self.clip(pixel_values=self.preprocess(images))
        return F.normalize(outputs.image_embeds, dim=-1)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        return self.head(self.image_embeddings(images)).squeeze(-1)
