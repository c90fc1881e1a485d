"""Rewards: the SD-scale reward models on tiny random models of the same architectures (nothing downloaded), the
LAION aesthetic head on the real file in ../shared/data, JPEG rewards, WeightedSum and the gradient self-check."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import string
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflowdiff.cli import main
from gflowdiff.rewards import (
    AestheticReward,
    ClipScoreReward,
    DigitClassifierReward,
    HPSv2Reward,
    ImageReward,
    JpegCompressibility,
    JpegIncompressibility,
    PickScoreReward,
    Reward,
    RewardGradientError,
    WeightedSum,
    check_reward_gradient,
)
from gflowdiff.rewards.aesthetic import load_aesthetic_head
from gflowdiff.rewards.loading import RewardLoadError
from gflowdiff.rewards.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    center_crop,
    check_unit_range,
    pad_to_square,
    resize_longest_side,
    resize_shortest_side,
)
from gflowdiff.zoo.tiny_sd import build_tiny_clip_tokenizer
from tests.package_walk import concrete_classes_defined_in

AESTHETIC_HEAD = Path("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cat", "an oil painting of a red fox"]
TINY_IMAGE = 16  # input side of every tiny reward model; test images are 32x32, so preprocessing resizes


def make_images(batch: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    return 0.2 + 0.6 * torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- tiny models of the real architectures, saved and loaded through the real loading code --------------------------
def build_tiny_clip(directory: Path, projection_dim: int) -> Path:
    """A random CLIPModel (widths 32, 1 layer, 16x16 input) + CLIPTokenizer + preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(directory)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).save_pretrained(
        directory
    )
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": TINY_IMAGE},
        "do_center_crop": True, "crop_size": {"height": TINY_IMAGE, "width": TINY_IMAGE},
        "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    }  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def build_tiny_bert_tokenizer(directory: Path) -> Path:
    """A real BertTokenizer (WordPiece over single characters) with BERT's special tokens."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits + ".,'!?-")
    tokens += ["##" + c for c in string.ascii_lowercase]
    BertTokenizer(vocab={token: index for index, token in enumerate(tokens)}, model_max_length=24).save_pretrained(
        directory
    )
    return directory


# ImageReward checkpoint in the ORIGINAL BLIP/ImageReward naming, written out by hand from BLIP's vit.py / med.py
# (not by inverting the loader's mapping), so that the loader's renaming is checked against an independent source.
IR_WIDTH, IR_LAYERS, IR_HEADS, IR_PATCH, IR_FFN, IR_MAX_POS = 32, 2, 2, 8, 32, 24


def build_tiny_image_reward_checkpoint(path: Path, vocab_size: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)

    def weight(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])

    def small(*shape: int) -> Tensor:
        return 0.1 * torch.randn(*shape, generator=generator)

    state: dict[str, Tensor] = {}

    def linear(prefix: str, fan_out: int, fan_in: int) -> None:
        state[prefix + ".weight"], state[prefix + ".bias"] = weight(fan_out, fan_in), small(fan_out)

    def layer_norm(prefix: str, width: int) -> None:
        state[prefix + ".weight"], state[prefix + ".bias"] = 1 + small(width), small(width)

    v, w = "blip.visual_encoder.", IR_WIDTH
    state[v + "cls_token"] = small(1, 1, w)
    state[v + "pos_embed"] = small(1, (TINY_IMAGE // IR_PATCH) ** 2 + 1, w)
    state[v + "patch_embed.proj.weight"] = weight(w, 3, IR_PATCH, IR_PATCH) / IR_PATCH
    state[v + "patch_embed.proj.bias"] = small(w)
    for i in range(IR_LAYERS):
        block = f"{v}blocks.{i}."
        layer_norm(block + "norm1", w)
        linear(block + "attn.qkv", 3 * w, w)
        linear(block + "attn.proj", w, w)
        layer_norm(block + "norm2", w)
        linear(block + "mlp.fc1", IR_FFN, w)
        linear(block + "mlp.fc2", w, IR_FFN)
    layer_norm(v + "norm", w)

    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = small(vocab_size, w)
    state[t + "embeddings.position_embeddings.weight"] = small(IR_MAX_POS, w)
    layer_norm(t + "embeddings.LayerNorm", w)
    state[t + "embeddings.position_ids"] = torch.arange(IR_MAX_POS).unsqueeze(0)  # a buffer old BERT code saved
    for i in range(IR_LAYERS):
        layer = f"{t}encoder.layer.{i}."
        for block in ("attention", "crossattention"):  # both w wide here; cross key/value read the ViT's width
            for name in ("query", "key", "value"):
                linear(f"{layer}{block}.self.{name}", w, w)
            linear(f"{layer}{block}.output.dense", w, w)
            layer_norm(f"{layer}{block}.output.LayerNorm", w)
        linear(layer + "intermediate.dense", IR_FFN, w)
        linear(layer + "output.dense", w, IR_FFN)
        layer_norm(layer + "output.LayerNorm", w)
    linear("blip.vision_proj", 8, w)  # BLIP's contrastive projections: in the checkpoint, unused by the score
    linear("blip.text_proj", 8, w)
    widths = [w, 1024, 128, 64, 16, 1]
    for index, fan_in, fan_out in zip((0, 2, 4, 6, 7), widths, widths[1:], strict=False):
        linear(f"mlp.layers.{index}", fan_out, fan_in)
    torch.save(state, path)
    return state


def reference_image_reward(state: dict[str, Tensor], pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """ImageReward's score_gard written from BLIP's vit.py / med.py with plain tensor ops (no transformers)."""
    batch, heads = pixels.shape[0], IR_HEADS

    def attention(q: Tensor, k: Tensor, v: Tensor, additive_mask: Tensor | None) -> Tensor:
        split = lambda x: x.reshape(batch, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731 (B, heads, N, d)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if additive_mask is not None:
            scores = scores + additive_mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, heads * q.shape[-1])

    p = lambda key: state["blip.visual_encoder." + key]  # noqa: E731
    x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=IR_PATCH)
    x = torch.cat([p("cls_token").expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + p("pos_embed")
    for i in range(IR_LAYERS):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (IR_WIDTH,), p(b + "norm1.weight"), p(b + "norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias")).chunk(3, dim=-1)  # timm's qkv order
        x = x + F.linear(attention(q, k, v, None), p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        h = F.layer_norm(x, (IR_WIDTH,), p(b + "norm2.weight"), p(b + "norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"))
        x = x + h + p(b + "mlp.fc2.bias")
    image_tokens = F.layer_norm(x, (IR_WIDTH,), p("norm.weight"), p("norm.bias"), eps=1e-6)

    t = lambda key: state["blip.text_encoder." + key]  # noqa: E731
    ln = lambda x, key: F.layer_norm(x, (IR_WIDTH,), t(key + ".weight"), t(key + ".bias"), eps=1e-12)  # noqa: E731
    lin = lambda x, key: F.linear(x, t(key + ".weight"), t(key + ".bias"))  # noqa: E731
    h = t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[: ids.shape[1]]
    h = ln(h, "embeddings.LayerNorm")
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(IR_LAYERS):
        layer = f"encoder.layer.{i}."
        for block, context, additive in (("attention", None, text_mask), ("crossattention", image_tokens, None)):
            source = h if context is None else context
            a = attention(
                lin(h, f"{layer}{block}.self.query"),
                lin(source, f"{layer}{block}.self.key"),
                lin(source, f"{layer}{block}.self.value"),
                additive,
            )
            h = ln(lin(a, f"{layer}{block}.output.dense") + h, f"{layer}{block}.output.LayerNorm")
        ffn = lin(F.gelu(lin(h, layer + "intermediate.dense")), layer + "output.dense")
        h = ln(ffn + h, layer + "output.LayerNorm")
    score = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        score = F.linear(score, state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"])
    return (score.squeeze(-1) - ImageReward.REWARD_MEAN) / ImageReward.REWARD_STD


# ---- a fake open_clip with the API HPSv2Reward uses (open_clip itself would pull another torch) ----------------------
class FakeVisual(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_size = (TINY_IMAGE, TINY_IMAGE)
        self.image_mean, self.image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.conv = nn.Conv2d(3, 16, 8, stride=8)
        self.proj = nn.Linear(16, 8)


class FakeOpenClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = FakeVisual()
        self.token_embedding = nn.Embedding(128, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.seen_image_sizes: list[tuple[int, int]] = []

    def encode_image(self, pixels: Tensor, normalize: bool = False) -> Tensor:
        self.seen_image_sizes.append(tuple(pixels.shape[-2:]))
        features = self.visual.proj(self.visual.conv(pixels).flatten(2).mean(-1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        features = self.token_embedding(tokens).mean(1)
        return F.normalize(features, dim=-1) if normalize else features


def fake_tokenize(prompts: list[str]) -> Tensor:
    return torch.tensor([[ord(c) % 128 for c in prompt[:12].ljust(12)] for prompt in prompts])


def fake_open_clip_module() -> types.ModuleType:
    module = types.ModuleType("open_clip")
    module.create_model = lambda name, pretrained=None, precision="fp32", device="cpu": FakeOpenClipModel()
    module.get_tokenizer = lambda name: fake_tokenize
    return module


# ---- session fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_clip_768(tmp_path_factory) -> Path:
    """Projection 768, the width the LAION aesthetic head expects."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_768"), projection_dim=768)


@pytest.fixture(scope="session")
def tiny_clip_16(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_16"), projection_dim=16)


@pytest.fixture(scope="session")
def tiny_bert_tokenizer(tmp_path_factory) -> Path:
    return build_tiny_bert_tokenizer(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_image_reward_checkpoint(tmp_path_factory, tiny_bert_tokenizer) -> tuple[Path, dict[str, Tensor]]:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_image_reward") / "ImageReward.pt"
    vocab_size = len(AutoTokenizer.from_pretrained(tiny_bert_tokenizer))
    return path, build_tiny_image_reward_checkpoint(path, vocab_size)


@pytest.fixture(scope="session")
def aesthetic_head_path(shared_data) -> Path:
    path = shared_data / AESTHETIC_HEAD
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def fake_hpsv2_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    model = FakeOpenClipModel()
    path = tmp_path_factory.mktemp("fake_hpsv2") / "HPS_v2.1_compressed.pt"
    # As HPSv2 saves it: a dict with a state_dict entry, here with DDP's "module." prefix as well.
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    return path


@pytest.fixture
def fake_open_clip(monkeypatch) -> types.ModuleType:
    module = fake_open_clip_module()
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return module


# Every SD-scale reward, built on its tiny model through its real constructor. Cached per session (building is slow).
_BUILT: dict[str, Reward] = {}


def build_reward(name: str, request: pytest.FixtureRequest) -> Reward:
    if name == "HPSv2Reward":  # built fresh: needs the fake open_clip only while constructing
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "open_clip", fake_open_clip_module())
            return HPSv2Reward(checkpoint=str(request.getfixturevalue("fake_hpsv2_checkpoint")))
    if name not in _BUILT:
        if name == "AestheticReward":
            _BUILT[name] = AestheticReward(
                clip_model=str(request.getfixturevalue("tiny_clip_768")),
                head_path=str(request.getfixturevalue("aesthetic_head_path")),
            )
        elif name == "ImageReward":
            path, _ = request.getfixturevalue("tiny_image_reward_checkpoint")
            _BUILT[name] = ImageReward(
                checkpoint=str(path),
                tokenizer=str(request.getfixturevalue("tiny_bert_tokenizer")),
                vision_heads=IR_HEADS,
                text_heads=IR_HEADS,
            )
        elif name == "PickScoreReward":
            tiny = str(request.getfixturevalue("tiny_clip_16"))
            _BUILT[name] = PickScoreReward(model=tiny, processor=tiny)
        elif name == "ClipScoreReward":
            _BUILT[name] = ClipScoreReward(model=str(request.getfixturevalue("tiny_clip_16")))
    return _BUILT[name]


SD_REWARDS = ["AestheticReward", "HPSv2Reward", "ImageReward", "PickScoreReward", "ClipScoreReward"]
FLAGS = {  # (differentiable, uses_prompt)
    "AestheticReward": (True, False),
    "HPSv2Reward": (True, True),
    "ImageReward": (True, True),
    "PickScoreReward": (True, True),
    "ClipScoreReward": (True, True),
}


# ---- the common contract of every SD-scale reward --------------------------------------------------------------------
@pytest.mark.parametrize("name", SD_REWARDS)
def test_reward_contract_shape_dtype_gradient_frozen(name, request):
    reward = build_reward(name, request)
    assert (reward.differentiable, reward.uses_prompt) == FLAGS[name]
    assert not reward.training
    params = dict(reward.named_parameters())
    assert params and not any(p.requires_grad for p in params.values()), "reward weights must be frozen"
    assert all(p.dtype == torch.float32 for p in params.values())
    before = {key: value.clone() for key, value in reward.state_dict().items()}

    images = make_images().requires_grad_(True)
    rewards = reward(images, PROMPTS)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    assert torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0, "no gradient reaches the image"
    assert all(p.grad is None for p in params.values())
    after = reward.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before), "a backward changed reward weights"

    reward.train()  # Lightning calls .train() on the module tree: a reward stays in eval mode
    assert not reward.training and not any(m.training for m in reward.modules())


@pytest.mark.parametrize("name", SD_REWARDS)
def test_reward_rejects_images_outside_unit_range(name, request):
    reward = build_reward(name, request)
    with pytest.raises(ValueError, match=rf"{name} expects images in \[0, 1\]"):
        reward(make_images() * 2 - 1, PROMPTS)  # [-1, 1] images: the classic mistake
    with pytest.raises(ValueError, match="expects images in"):
        reward(torch.full((2, 3, 32, 32), float("nan")), PROMPTS)
    reward(make_images().clamp(0, 1) * (1 + 5e-4), PROMPTS)  # within tolerance: accepted


@pytest.mark.parametrize("name", SD_REWARDS)
def test_reward_passes_gradient_self_check(name, request):
    check_reward_gradient(build_reward(name, request), (2, 3, 32, 32), torch.Generator().manual_seed(0), PROMPTS)


@pytest.mark.parametrize("name", ["HPSv2Reward", "ImageReward", "PickScoreReward", "ClipScoreReward"])
def test_prompt_aware_rewards_depend_on_the_prompt_and_check_counts(name, request):
    reward = build_reward(name, request)
    images = make_images()
    same = reward(images, [PROMPTS[0], PROMPTS[0]])
    other = reward(images, [PROMPTS[1], PROMPTS[1]])
    assert not torch.allclose(same, other)
    # Image i is scored with prompt i only (the diagonal): swapping the batch order swaps the rewards.
    forward = reward(images, PROMPTS)
    swapped = reward(images.flip(0), PROMPTS[::-1])
    torch.testing.assert_close(swapped, forward.flip(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images, PROMPTS[:1])


# ---- hub loading fails fast and names the option ---------------------------------------------------------------------
@pytest.fixture
def offline():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported")


HUB_CASES = {
    "aesthetic head repo": (lambda f: AestheticReward(), "--model.reward.head_repo"),
    "aesthetic clip": (
        lambda f: AestheticReward(head_path=str(f("aesthetic_head_path"))),
        "--model.reward.clip_model",
    ),
    "image_reward tokenizer": (lambda f: ImageReward(), "--model.reward.tokenizer"),
    "image_reward checkpoint": (
        lambda f: ImageReward(tokenizer=str(f("tiny_bert_tokenizer"))),
        "--model.reward.checkpoint",
    ),
    "pickscore processor": (lambda f: PickScoreReward(), "--model.reward.processor"),
    "pickscore model": (lambda f: PickScoreReward(processor=str(f("tiny_clip_16"))), "--model.reward.model"),
    "clip_score model": (lambda f: ClipScoreReward(), "--model.reward.model"),
    "clip_score model (processor given)": (
        lambda f: ClipScoreReward(processor=str(f("tiny_clip_16"))),
        "--model.reward.model",
    ),
}


@pytest.mark.parametrize("case", HUB_CASES)
def test_hub_ids_fail_fast_offline_naming_the_option(case, offline, request):
    build, option = HUB_CASES[case]
    started = time.perf_counter()
    with pytest.raises(RewardLoadError) as error:
        build(request.getfixturevalue)
    assert time.perf_counter() - started < 20  # no network retries
    message = str(error.value)
    assert message.startswith(option), message
    assert "HF_HUB_OFFLINE" in message


def test_hpsv2_hub_checkpoint_fails_offline_naming_the_option(fake_open_clip, offline):
    with pytest.raises(RewardLoadError, match=r"^--model.reward.checkpoint: 'xswu/HPSv2'.*HF_HUB_OFFLINE"):
        HPSv2Reward()


def test_local_paths_that_do_not_exist_name_the_option(tmp_path, tiny_clip_16):
    with pytest.raises(RewardLoadError, match="--model.reward.head_path"):
        AestheticReward(head_path=str(tmp_path / "missing.pth"))
    with pytest.raises(
        RewardLoadError, match=r"--model.reward.checkpoint: the folder .* holds no file 'ImageReward.pt'"
    ):
        ImageReward(checkpoint=str(tmp_path), tokenizer=str(tiny_clip_16))
    with pytest.raises(RewardLoadError, match=r"^--model.reward.model: "):
        ClipScoreReward(model=str(tmp_path))  # an empty folder: no tokenizer, no weights


# ---- AestheticReward -------------------------------------------------------------------------------------------------
def test_real_laion_head_loads_with_expected_shapes(aesthetic_head_path):
    head = load_aesthetic_head(str(aesthetic_head_path)).eval()
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (768, 1024),
        (1024, 128),
        (128, 64),
        (64, 16),
        (16, 1),
    ]
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    embedding = F.normalize(torch.randn(1, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    value = head(embedding)
    assert value.shape == (1, 1) and torch.isfinite(value).all()
    assert 0 < value.item() < 15  # an aesthetic score on LAION's 1–10 scale, give or take for a random embedding


def test_aesthetic_head_rejects_other_state_dicts(tmp_path):
    path = tmp_path / "not_a_head.pth"
    torch.save(nn.Linear(4, 1).state_dict(), path)
    with pytest.raises(RewardLoadError, match="--model.reward.head_path: not a LAION MLP head"):
        load_aesthetic_head(str(path))
    torch.save({"layers.0.weight": torch.zeros(3)}, path)
    with pytest.raises(RewardLoadError, match="missing"):
        load_aesthetic_head(str(path))


def test_aesthetic_equals_head_on_normalised_clip_embedding(request):
    reward = build_reward("AestheticReward", request)
    images = make_images()
    clip = reward.clip
    # By hand: resize 32 → 16 (shorter side) + crop (no-op), CLIP mean/std, projection, L2 norm, LAION head.
    pixels = F.interpolate(images, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    embedding = clip.visual_projection(clip.vision_model(pixel_values=(pixels - mean) / std).pooler_output)
    expected = reward.head(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(reward(images, ["ignored", "also ignored"]), expected)


def test_aesthetic_rejects_clip_with_other_projection_dim(tiny_clip_16, aesthetic_head_path):
    with pytest.raises(ValueError, match=r"--model.reward.clip_model .* 16-d .* expects 768-d"):
        AestheticReward(clip_model=str(tiny_clip_16), head_path=str(aesthetic_head_path))


# ---- ImageReward -----------------------------------------------------------------------------------------------------
def test_image_reward_matches_blip_reference_forward(request, tiny_image_reward_checkpoint):
    reward = build_reward("ImageReward", request)
    _, state = tiny_image_reward_checkpoint
    images = 0.2 + 0.6 * torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(5))
    # Padded to the full length (as ImageReward does): the reward pads to the longest prompt; masks make them equal.
    length = reward.max_prompt_tokens
    tokens = reward.tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    expected = reference_image_reward(state, (images - mean) / std, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-4, atol=1e-4)
    assert reward.vision.config.num_hidden_layers == IR_LAYERS and reward.text.config.num_hidden_layers == IR_LAYERS
    assert reward.vision.config.image_size == TINY_IMAGE and reward.max_prompt_tokens == IR_MAX_POS


def test_image_reward_truncates_prompts_at_max_prompt_tokens(tiny_image_reward_checkpoint, tiny_bert_tokenizer):
    path, _ = tiny_image_reward_checkpoint
    short = ImageReward(
        str(path), tokenizer=str(tiny_bert_tokenizer), max_prompt_tokens=4, vision_heads=2, text_heads=2
    )
    images = make_images()
    # With 4 tokens only "[CLS] a p [SEP]" is left of "a photo ..." and "a pizza", so both prompts score the same.
    torch.testing.assert_close(*[short(images, [p, p]) for p in ("a photo of a cat", "a pizza")])


def test_image_reward_checkpoint_errors(tmp_path, tiny_bert_tokenizer, tiny_image_reward_checkpoint):
    _, state = tiny_image_reward_checkpoint
    broken = {k: v for k, v in state.items() if "blocks.1.attn.proj" not in k}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(RewardLoadError, match=r"--model.reward.checkpoint: .*ViT.*missing"):
        ImageReward(str(tmp_path / "broken.pt"), tokenizer=str(tiny_bert_tokenizer), vision_heads=2, text_heads=2)
    path, _ = tiny_image_reward_checkpoint
    with pytest.raises(ValueError, match="--model.reward.vision_heads 5"):
        ImageReward(str(path), tokenizer=str(tiny_bert_tokenizer), vision_heads=5, text_heads=2)


# ---- HPSv2Reward -----------------------------------------------------------------------------------------------------
def test_hpsv2_without_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gflowdiff\[hpsv2\]'"):
        HPSv2Reward()


def test_hpsv2_loads_checkpoint_and_scores_the_diagonal(fake_open_clip, fake_hpsv2_checkpoint):
    reward = HPSv2Reward(checkpoint=str(fake_hpsv2_checkpoint))
    saved = torch.load(fake_hpsv2_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(reward.model.visual.proj.weight, saved["module.visual.proj.weight"])
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1  # portrait
    rewards = reward(images, PROMPTS)
    # HPSv2's ResizeMaxSize: the longer side 32 → 16, the shorter 24 → 12, zero-padded to 16x16 (2 columns each side).
    assert reward.model.seen_image_sizes[-1] == (TINY_IMAGE, TINY_IMAGE)
    resized = F.interpolate(images, size=(16, 12), mode="bicubic", antialias=True, align_corners=False)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pixels = (F.pad(resized, (2, 2, 0, 0)) - mean) / std
    similarity = (
        reward.model.encode_image(pixels, normalize=True)
        @ reward.model.encode_text(fake_tokenize(PROMPTS), normalize=True).T
    )  # (B, B)
    torch.testing.assert_close(rewards, similarity.diagonal())


def test_hpsv2_rejects_a_checkpoint_of_another_architecture(fake_open_clip, tmp_path):
    torch.save({"state_dict": {"visual.other.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(RewardLoadError, match=r"--model.reward.checkpoint: .*does not fit open_clip's 'ViT-H-14'"):
        HPSv2Reward(checkpoint=str(tmp_path / "other.pt"))


# ---- PickScore and ClipScore -----------------------------------------------------------------------------------------
def test_pickscore_is_logit_scale_times_cosine_and_clip_score_is_weight_times_cosine(request, tiny_clip_16):
    pick = build_reward("PickScoreReward", request)
    clip = build_reward("ClipScoreReward", request)
    images = make_images()
    cosine = pick.embedder.cosine(images, PROMPTS)
    assert cosine.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(pick(images, PROMPTS), pick.embedder.clip.logit_scale.exp() * cosine)
    torch.testing.assert_close(clip(images, PROMPTS), 100.0 * cosine)  # same tiny CLIP, default weight 100
    torch.testing.assert_close(ClipScoreReward(model=str(tiny_clip_16), weight=2.5)(images, PROMPTS), 2.5 * cosine)
    with pytest.raises(ValueError, match="--model.reward.weight"):
        ClipScoreReward(model=str(tiny_clip_16), weight=float("nan"))


# ---- JPEG ------------------------------------------------------------------------------------------------------------
def test_jpeg_rewards_rank_noise_against_a_flat_image():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    compressibility, incompressibility = JpegCompressibility(), JpegIncompressibility(quality=95)
    small, large = (-compressibility(images, ["", ""])).tolist()
    assert 0 < small < 2 < large  # a flat 64x64 JPEG is ~1 kB of headers; noise at q95 is ~10 kB
    assert compressibility(images, ["", ""]).argmax() == 0 and incompressibility(images, ["", ""]).argmax() == 1
    torch.testing.assert_close(incompressibility(images, ["", ""]), -compressibility(images, ["", ""]))
    assert compressibility(images, ["", ""]).dtype == torch.float32
    assert JpegCompressibility(quality=10)(noisy, [""]) > compressibility(noisy, [""])  # lower quality, smaller file
    assert JpegCompressibility()(torch.rand(2, 1, 16, 16), ["", ""]).shape == (2,)  # grayscale


def test_jpeg_rewards_are_not_differentiable_and_validate():
    for cls in (JpegCompressibility, JpegIncompressibility):
        assert (cls.differentiable, cls.uses_prompt) == (False, False)
        with pytest.raises(ValueError, match="--model.reward.quality"):
            cls(quality=0)
        with pytest.raises(ValueError, match=f"{cls.__name__} expects images in"):
            cls()(make_images() * 2 - 1, ["", ""])
        with pytest.raises(ValueError, match="differentiable = False"):
            check_reward_gradient(cls(), (1, 3, 8, 8), torch.Generator())


# ---- WeightedSum -----------------------------------------------------------------------------------------------------
class Brightness(Reward):
    """r = mean pixel value (differentiable, prompt-free)."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class PromptLength(Reward):
    """r = number of characters of the prompt (prompt-aware; constant in the image)."""

    uses_prompt = True

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return torch.tensor([float(len(p)) for p in prompts]) + 0 * images.sum(dim=(1, 2, 3))


def test_weighted_sum_combines_terms_and_logs_them():
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    reward = WeightedSum([Brightness(), PromptLength(), Brightness()], weights=[2.0, 0.5, -1.0])
    assert (reward.differentiable, reward.uses_prompt) == (True, True)
    # Image 0: 2·0.25 + 0.5·len("ab") − 1·0.25 = 0.5 + 1 − 0.25 = 1.25; image 1: 1.5 + 0.5·4 − 0.75 = 2.75.
    torch.testing.assert_close(reward(images, ["ab", "abcd"]), torch.tensor([1.25, 2.75]))
    assert list(reward.last_terms) == ["Brightness_0", "PromptLength", "Brightness_2"]
    torch.testing.assert_close(reward.last_terms["PromptLength"], torch.tensor([2.0, 4.0]))
    assert not reward.last_terms["Brightness_0"].requires_grad
    images.requires_grad_(True)
    reward(images, ["ab", "abcd"]).sum().backward()
    # ∂/∂pixel of (2 − 1)·mean = 1/48 per pixel (48 pixels per image).
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / 48))


def test_weighted_sum_flags_and_validation():
    assert WeightedSum([Brightness()]).weights == [1.0]
    mixed = WeightedSum([Brightness(), JpegCompressibility()])
    assert (mixed.differentiable, mixed.uses_prompt) == (False, False)
    assert (Brightness.differentiable, WeightedSum.differentiable) == (True, True)  # class flags untouched
    with pytest.raises(ValueError, match="--model.reward.weights has 1 values but --model.reward.rewards has 2"):
        WeightedSum([Brightness(), Brightness()], weights=[1.0])
    with pytest.raises(ValueError, match="--model.reward.rewards"):
        WeightedSum([])


# ---- the gradient self-check -----------------------------------------------------------------------------------------
class NoGradReward(Brightness):
    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return super().score(images, prompts)


class DetachedReward(Brightness):
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return super().score(images.detach(), prompts)


class PartlyDetachedReward(Reward):
    """r = Σ x² / N + mean x, with the quadratic term detached: autograd sees only the linear part's gradient."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (images.detach() ** 2).mean(dim=(1, 2, 3)) * 50 + images.mean(dim=(1, 2, 3))


class SaturatedReward(Reward):
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.clamp(0.9, 1.0).mean(dim=(1, 2, 3))  # test images are in [0.2, 0.8]: flat


class NaNReward(Reward):
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_self_check_passes_for_good_rewards():
    generator = torch.Generator().manual_seed(0)
    check_reward_gradient(Brightness(), (2, 3, 8, 8), generator)
    check_reward_gradient(DigitClassifierReward(), (2, 1, 8, 8), generator)
    check_reward_gradient(WeightedSum([Brightness(), PromptLength()], [1.0, 3.0]), (2, 3, 8, 8), generator)


@pytest.mark.parametrize(
    "planted, message",
    [
        (NoGradReward, "do not depend on the image in autograd"),
        (DetachedReward, "do not depend on the image in autograd"),
        (PartlyDetachedReward, "disagrees with finite differences"),
        (SaturatedReward, "exactly zero"),
        (NaNReward, "non-finite rewards"),
    ],
)
def test_self_check_catches_broken_gradients(planted, message):
    with pytest.raises(RewardGradientError) as error:
        check_reward_gradient(planted(), (2, 3, 8, 8), torch.Generator().manual_seed(0))
    assert planted.__name__ in str(error.value) and message in str(error.value)


def test_self_check_works_inside_no_grad():
    with torch.no_grad():
        check_reward_gradient(Brightness(), (1, 3, 4, 4), torch.Generator().manual_seed(0))


# ---- preprocessing ---------------------------------------------------------------------------------------------------
def test_geometry_helpers_match_torchvision_conventions():
    image = torch.arange(6 * 8, dtype=torch.float32).view(1, 1, 6, 8)
    # torchvision CenterCrop: top = round((6 − 4) / 2) = 1, left = round((8 − 4) / 2) = 2.
    assert torch.equal(center_crop(image, 4), image[..., 1:5, 2:6])
    assert resize_shortest_side(torch.rand(1, 3, 20, 30), 10).shape[-2:] == (10, 15)
    assert resize_longest_side(torch.rand(1, 3, 20, 30), 15).shape[-2:] == (10, 15)
    padded = pad_to_square(torch.ones(1, 1, 3, 6), 6)  # 3 rows to add: 1 above, 2 below (torchvision puts odd last)
    assert padded[0, 0, :, 0].tolist() == [0, 1, 1, 1, 0, 0]


def test_image_preprocess_is_differentiable_and_normalises():
    preprocess = ImagePreprocess(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), mode="crop")
    images = torch.full((1, 3, 12, 16), 0.75, requires_grad=True)
    out = preprocess(images)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, torch.ones_like(out))  # (0.75 − 0.5) / 0.25; a constant survives resizing
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    assert not dict(preprocess.state_dict())  # mean/std buffers are not persistent


def test_check_unit_range_tolerance():
    check_unit_range(torch.tensor([0.0, 1.0005]), "R")
    with pytest.raises(ValueError, match=r"R expects images in \[0, 1\], got values in \[-0.5"):
        check_unit_range(torch.tensor([-0.5, 1.0]), "R")


# ---- registration ----------------------------------------------------------------------------------------------------
EXPORTED = [
    AestheticReward, ClipScoreReward, DigitClassifierReward, HPSv2Reward, ImageReward, JpegCompressibility,
    JpegIncompressibility, PickScoreReward, WeightedSum,
]  # fmt: skip


def test_every_concrete_reward_is_exported():
    package = importlib.import_module("gflowdiff.rewards")
    defined = concrete_classes_defined_in(package, Reward)  # every module imported (package_walk.py)
    assert set(defined) == set(EXPORTED)
    assert all(getattr(package, cls.__name__) is cls and cls.__name__ in package.__all__ for cls in EXPORTED)


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_reward_resolves_by_short_name_with_help(cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.objective", "DDPO", "--model.reward", cls.__name__, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = re.search(r"reward:\n\s+class_path: (\S+)\n", capsys.readouterr().out)
    assert printed and printed.group(1).endswith(f".{cls.__name__}")
    with pytest.raises(SystemExit):
        main(["fit", "--model.reward.help", cls.__name__])
    out = capsys.readouterr().out
    for parameter in list(inspect.signature(cls.__init__).parameters)[1:]:  # each Args: entry becomes --help text
        assert f"--model.reward.{parameter}" in out, f"{parameter} missing from --model.reward.help {cls.__name__}"


def test_weighted_sum_config_with_nested_rewards(tmp_path, capsys):
    config = tmp_path / "reward.yaml"
    config.write_text(
        "model:\n  reward:\n    class_path: WeightedSum\n    init_args:\n      weights: [1.0, 0.1]\n      rewards:\n"
        "        - class_path: AestheticReward\n        - class_path: JpegCompressibility\n"
        "          init_args: {quality: 80}\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--model.objective", "DDPO", "--config", str(config), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: gflowdiff.rewards.AestheticReward" in out and "quality: 80" in out


# ---- every differentiable reward drives a real fit on the tiny SD pipeline ------------------------------------------
@pytest.mark.parametrize("name", [*SD_REWARDS, "WeightedSum"])
def test_tiny_pipeline_fit_runs_with_each_differentiable_reward(name, request, tiny_sd_path, tmp_path):
    import lightning as L

    from gflowdiff.diffusion.sampling import SamplerConfig
    from gflowdiff.objectives import ResidualNablaDB
    from gflowdiff.training.data import PromptDataModule
    from gflowdiff.training.module import GFlowDiffModule
    from gflowdiff.training.optimization import OptimizationConfig

    if name == "WeightedSum":
        reward = WeightedSum(
            rewards=[build_reward("ClipScoreReward", request), DigitClassifierReward()], weights=[0.5, 1]
        )
    else:
        reward = build_reward(name, request)
    frozen = {k: v.clone() for k, v in reward.state_dict().items()}
    module = GFlowDiffModule(
        objective=ResidualNablaDB(timestep_fraction=0.5),
        reward=reward,
        pretrained_model=str(tiny_sd_path),
        sampler=SamplerConfig(num_inference_steps=2, guidance_scale=2.0),
        optimization=OptimizationConfig(train_batch_size=4),
    )
    lora_before = [p.detach().clone() for p in module.policy.lora_parameters()]
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        if name == "HPSv2Reward":
            patch.setitem(sys.modules, "open_clip", fake_open_clip_module())
        trainer.fit(module, PromptDataModule(train_prompts="animals", batch_size=2))
    assert trainer.global_step == 2 and module.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, module.policy.lora_parameters(), strict=True))
    assert all(torch.equal(frozen[k], v) for k, v in reward.state_dict().items())  # the reward stayed frozen
