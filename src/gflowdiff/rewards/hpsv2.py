"""HPSv2.1: human preference score from an open_clip ViT-H-14 fine-tuned on HPDv2 (docs/method.md §4.4).

open_clip is an optional dependency (``pip install 'gflowdiff[hpsv2]'``), imported only when the reward is built.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.loading import RewardLoadError, load_state_dict, resolve_file, tensors_only
from gflowdiff.rewards.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    check_prompts,
    check_unit_range,
)

EXTRA = "hpsv2"


def import_open_clip() -> Any:
    """``import open_clip``, or an ImportError that names the extra to install."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"HPSv2Reward needs the open_clip package, an optional dependency of gflowdiff: "
            f"pip install 'gflowdiff[{EXTRA}]' (or pip install open_clip_torch)"
        ) from error
    return open_clip


def _image_size(visual: Any) -> int:
    size = getattr(visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"HPSv2Reward expects a square image encoder, got image_size {tuple(size)}")
        size = size[0]
    return int(size)


class HPSv2Reward(Reward):
    """HPSv2(.1) score: cosine similarity of the open_clip image and text embeddings of each image with its prompt
    (the diagonal of ``image_features @ text_features.T``, both L2-normalised; about 0.2–0.35, not ×100).

    Preprocessing follows HPSv2's evaluation transform, differentiably: resize the longer side to the encoder's
    input size (bicubic, antialiased), zero-pad to a square, normalise with the encoder's mean/std.

    Args:
        model_name: open_clip architecture; HPSv2 and HPSv2.1 are ``ViT-H-14``.
        checkpoint: hub repo id holding ``checkpoint_filename``, or a local checkpoint file (a dict with a
            ``state_dict`` entry, or a plain state dict).
        checkpoint_filename: file in the ``checkpoint`` repo; ``HPS_v2.1_compressed.pt`` is HPSv2.1,
            ``HPS_v2_compressed.pt`` is HPSv2.
    """

    differentiable = True
    uses_prompt = True

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        checkpoint: str = "xswu/HPSv2",
        checkpoint_filename: str = "HPS_v2.1_compressed.pt",
    ):
        super().__init__()
        open_clip = import_open_clip()
        option = "--model.reward.checkpoint"
        state = load_state_dict(resolve_file(checkpoint, checkpoint_filename, option), option)
        state = tensors_only(state.get("state_dict", state), option)
        state = {key.removeprefix("module."): value for key, value in state.items()}  # DDP-saved checkpoints

        try:
            self.model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as error:
            raise ValueError(f"--model.reward.model_name {model_name!r}: open_clip cannot build it: {error}") from error
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RewardLoadError(
                f"{option}: the checkpoint does not fit open_clip's {model_name!r} (--model.reward.model_name): {error}"
            ) from error
        self.model.float()
        visual = self.model.visual
        self.preprocess = ImagePreprocess(
            _image_size(visual),
            getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN,
            getattr(visual, "image_std", None) or OPENAI_CLIP_STD,
            mode="pad",
        )
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        check_prompts(images, prompts, type(self).__name__)
        image_features = self.model.encode_image(self.preprocess(images), normalize=True)  # (B, D)
        tokens = self.tokenizer(prompts).to(images.device)  # (B, context length)
        text_features = self.model.encode_text(tokens, normalize=True)  # (B, D)
        return (image_features * text_features).sum(dim=-1)  # diag(image_features @ text_features.T)
