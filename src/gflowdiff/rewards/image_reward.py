"""ImageReward v1.0 (Xu et al. 2023) rebuilt from transformers' BLIP components (docs/method.md §4.4).

ImageReward is BLIP's image-grounded text encoder: a ViT-L/16 encodes the image, a BERT-base text encoder reads the
prompt with cross-attention to the image tokens, and the LAION-style MLP head maps the [CLS] state to a score, which
is standardised with the mean and std of the training set. The released checkpoint (``ImageReward.pt``) uses the
original BLIP module names; :func:`convert_image_reward_state_dict` maps them onto transformers' ``BlipVisionModel``
and ``BlipTextModel``, whose layers are ports of the same code (BLIP ``vit.py``, ``med.py``). The architecture sizes
are read from the checkpoint's tensor shapes; only the head counts are not stored and are options.
"""

from __future__ import annotations

import re
import warnings

from torch import Tensor, nn

from gflowdiff.rewards.aesthetic import LaionMLPHead, head_from_state_dict
from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.loading import RewardLoadError, load_state_dict, load_tokenizer, resolve_file, tensors_only
from gflowdiff.rewards.preprocessing import ImagePreprocess, check_prompts, check_unit_range

VISION_PREFIX, TEXT_PREFIX, HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
#: Checkpoint entries ImageReward's score does not use: BLIP's contrastive projections and a buffer.
UNUSED_PATTERNS = (r"blip\.vision_proj\..*", r"blip\.text_proj\..*", r".*\.position_ids")
#: BLIP's ViT uses LayerNorm eps 1e-6 (timm); its BERT uses 1e-12 (med_config.json).
VISION_LAYER_NORM_EPS, TEXT_LAYER_NORM_EPS = 1e-6, 1e-12

# BLIP ViT (timm naming) → transformers BlipVisionModel; applied in order to the key after VISION_PREFIX.
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
)


def _rename_vision_key(key: str) -> str | None:
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def convert_image_reward_state_dict(
    state: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], list[str]]:
    """ImageReward's keys → (BlipVisionModel state, BlipTextModel state, head state, keys not used).

    The vision keys are renamed (timm → transformers, e.g. ``blocks.3.attn.qkv`` → ``encoder.layers.3.self_attn.qkv``;
    the fused qkv layout is the same in both). The text keys need no renaming: ``BlipTextModel`` keeps BLIP
    ``med.py``'s names (``encoder.layer.3.crossattention.self.key``...). The head keeps ``layers.N``.
    """
    vision, text, head, unused = {}, {}, {}, []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in UNUSED_PATTERNS):
            unused.append(key)
        elif key.startswith(VISION_PREFIX) and (renamed := _rename_vision_key(key[len(VISION_PREFIX) :])):
            vision[renamed] = value
        elif key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX) :]] = value
        elif key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX) :]] = value
        else:
            unused.append(key)
    return vision, text, head, unused


def _count_layers(state: dict[str, Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def build_blip_towers(
    vision_state: dict[str, Tensor], text_state: dict[str, Tensor], vision_heads: int, text_heads: int, option: str
) -> tuple[nn.Module, nn.Module]:
    """A BlipVisionModel and a BlipTextModel (with cross-attention) sized from the converted state dicts."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    try:
        hidden = vision_state["embeddings.class_embedding"].shape[-1]
        patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
        grid = round((vision_state["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
        vocab, text_hidden = text_state["embeddings.word_embeddings.weight"].shape
        encoder_width = text_state["encoder.layer.0.crossattention.self.key.weight"].shape[1]
        vision_config = BlipVisionConfig(
            hidden_size=hidden,
            intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_count_layers(vision_state, r"encoder\.layers\.(\d+)\."),
            num_attention_heads=vision_heads,
            image_size=grid * patch,
            patch_size=patch,
            layer_norm_eps=VISION_LAYER_NORM_EPS,
            hidden_act="gelu",
        )
        text_config = BlipTextConfig(
            vocab_size=vocab,
            hidden_size=text_hidden,
            encoder_hidden_size=encoder_width,
            intermediate_size=text_state["encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=_count_layers(text_state, r"encoder\.layer\.(\d+)\."),
            num_attention_heads=text_heads,
            max_position_embeddings=text_state["embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=TEXT_LAYER_NORM_EPS,
            hidden_act="gelu",
            is_decoder=True,  # builds the cross-attention layers; forward still uses a bidirectional mask
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
        )
    except (KeyError, IndexError) as error:
        raise RewardLoadError(f"{option}: not an ImageReward/BLIP checkpoint (no entry for {error})") from error
    if hidden % vision_heads:
        raise ValueError(f"--model.reward.vision_heads {vision_heads} does not divide the ViT width {hidden}")
    if text_hidden % text_heads:
        raise ValueError(f"--model.reward.text_heads {text_heads} does not divide the text width {text_hidden}")
    if encoder_width != hidden:
        raise RewardLoadError(f"{option}: the text encoder cross-attends to width {encoder_width}, the ViT is {hidden}")
    vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    for name, module, state in (("ViT", vision, vision_state), ("text encoder", text, text_state)):
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing or unexpected:
            raise RewardLoadError(
                f"{option}: the checkpoint's {name} does not match BLIP's: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}"
            )
    return vision, text


class ImageReward(Reward):
    """ImageReward v1.0: BLIP-based human preference reward for text-to-image generation (roughly −2…2, standardised).

    score = (MLP(h_CLS) − 0.16717) / 1.03334, where h_CLS is the final [CLS] state of the BERT text encoder reading
    the prompt with cross-attention to the BLIP ViT-L/16 image tokens. Preprocessing matches ImageReward's
    ``Resize(224, bicubic) + CenterCrop(224) + Normalize(CLIP mean/std)``, on tensors and differentiably.

    Args:
        checkpoint: hub repo id holding ``checkpoint_filename``, or a local ``ImageReward.pt`` (a state dict with
            ImageReward's original ``blip.*`` / ``mlp.*`` keys).
        checkpoint_filename: file in the ``checkpoint`` repo.
        tokenizer: hub id or local folder of the BERT tokenizer (ImageReward uses ``bert-base-uncased``; the two
            tokens BLIP adds, [DEC] and [ENC], are never produced from plain prompts).
        max_prompt_tokens: truncation length of the prompt in tokens; default: the tokenizer's maximum (512 for
            BERT), as the ∇-GFlowNet reference's ``score_gard`` call does. ImageReward's own ``score()`` uses 35.
        vision_heads: attention heads of the ViT (16 for ViT-L); not stored in the checkpoint.
        text_heads: attention heads of the text encoder (12 for BERT-base); not stored in the checkpoint.
    """

    differentiable = True
    uses_prompt = True

    #: Standardisation constants of ImageReward v1.0 (``ImageReward.mean`` / ``ImageReward.std``).
    REWARD_MEAN = 0.16717362830052426
    REWARD_STD = 1.0333394966054072

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        checkpoint_filename: str = "ImageReward.pt",
        tokenizer: str = "bert-base-uncased",
        max_prompt_tokens: int | None = None,
        vision_heads: int = 16,
        text_heads: int = 12,
    ):
        super().__init__()
        if max_prompt_tokens is not None and max_prompt_tokens < 2:
            raise ValueError("--model.reward.max_prompt_tokens must be >= 2 ([CLS] and [SEP]) or null")
        if vision_heads < 1 or text_heads < 1:
            raise ValueError("--model.reward.vision_heads and --model.reward.text_heads must be >= 1")
        self.tokenizer = load_tokenizer(tokenizer, "--model.reward.tokenizer")
        option = "--model.reward.checkpoint"
        state = load_state_dict(resolve_file(checkpoint, checkpoint_filename, option), option)
        vision_state, text_state, head_state, unused = convert_image_reward_state_dict(tensors_only(state, option))
        self.vision, self.text = build_blip_towers(vision_state, text_state, vision_heads, text_heads, option)
        self.head: LaionMLPHead = head_from_state_dict(head_state, option)
        if self.head.input_dim != self.text.config.hidden_size:
            raise RewardLoadError(
                f"{option}: the MLP head reads {self.head.input_dim}-d features but the text encoder is "
                f"{self.text.config.hidden_size} wide"
            )
        surprising = [key for key in unused if not any(re.fullmatch(p, key) for p in UNUSED_PATTERNS)]
        if surprising:
            warnings.warn(
                f"ImageReward: ignoring {len(surprising)} unknown checkpoint entries, e.g. {surprising[:4]}",
                stacklevel=2,
            )
        self.max_prompt_tokens = max_prompt_tokens or min(
            self.tokenizer.model_max_length, self.text.config.max_position_embeddings
        )
        self.preprocess = ImagePreprocess(self.vision.config.image_size, mode="crop")  # CLIP mean/std, as ImageReward
        self.float()
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_unit_range(images, type(self).__name__)
        check_prompts(images, prompts, type(self).__name__)
        image_tokens = self.vision(pixel_values=self.preprocess(images)).last_hidden_state  # (B, 1 + patches, D_v)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt"
        )
        text = self.text(
            input_ids=tokens["input_ids"].to(images.device),
            attention_mask=tokens["attention_mask"].to(images.device),
            encoder_hidden_states=image_tokens,  # every image token is attended to (ImageReward's all-ones mask)
        ).last_hidden_state  # (B, L, D_t)
        raw = self.head(text[:, 0]).squeeze(-1)  # [CLS] → (B,)
        return (raw - self.REWARD_MEAN) / self.REWARD_STD
