"""The diffusion policy: Stable-Diffusion-style diffusers components with a peft LoRA on the UNet.

One loading path for every model: ``from_pretrained`` on a hub id or a local folder in the diffusers layout
(``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, optional ``vae/``, ``model_index.json``). The embedded
digits model is such a folder inside the package (``embedded:digits``). The pretrained reference policy P_F^# is the
same UNet with its adapters disabled, so there is never a second copy of the UNet in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.adapter_rows import LoraRowMask, all_rows
from gflowdiff.diffusion.kernels import DDPMKernel, TransitionStep
from gflowdiff.diffusion.math import alpha_bar, epsilon_from_model_output

EMBEDDED_MODELS = {  # under the gflowdiff package
    "embedded:digits": "zoo/weights/digits",
    "embedded:digits_flow": "zoo/weights/digits_flow",
}
PRETRAINED_OPTION = "--model.pretrained_model"
SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDIMScheduler computes ᾱ from
SUPPORTED_TIMESTEP_SPACINGS = ("leading",)  # math.previous_timesteps: t − T // N
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # math.epsilon_from_model_output
_ANNOUNCED_SCHEDULERS: set[tuple[str, str]] = set()  # (model path, scheduler class) already named in the log


@dataclass
class LoRAConfig:
    """LoRA on the UNet's attention projections (docs/method.md §4.1: rank 8, alpha 8, Gaussian init, B = 0).

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (scale = alpha / rank).
        target_modules: names of the UNet Linear layers that get an adapter.
    """

    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("--model.lora.rank must be >= 1")
        if not self.alpha > 0:
            raise ValueError("--model.lora.alpha must be > 0")
        if not self.target_modules:
            raise ValueError("--model.lora.target_modules must name at least one layer (e.g. [to_q, to_k, to_v])")


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


class DiffusionPolicy(nn.Module):
    """UNet + LoRA, text encoder, tokenizer, optional VAE and the sampler's noise schedule.

    Frozen components are stored in ``frozen_dtype``; LoRA parameters are always fp32.
    """

    def __init__(
        self,
        pretrained_model: str,
        revision: str | None = None,
        lora: LoRAConfig | None = None,
        frozen_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from peft import LoraConfig

        lora = lora or LoRAConfig()
        path = resolve_pretrained_path(pretrained_model)
        index = load_model_index(path, revision)
        kwargs = {"revision": revision} if revision else {}
        tokenizer_class = getattr(
            transformers, (index.get("tokenizer") or [None, "AutoTokenizer"])[1] or "AutoTokenizer"
        )
        encoder_class = getattr(
            transformers, (index.get("text_encoder") or [None, "CLIPTextModel"])[1] or "CLIPTextModel"
        )
        self.tokenizer = tokenizer_class.from_pretrained(path, subfolder="tokenizer", **kwargs)
        self.text_encoder = encoder_class.from_pretrained(path, subfolder="text_encoder", dtype=frozen_dtype, **kwargs)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=frozen_dtype, **kwargs)
        self.latent_size = square_sample_size(self.unet.config.sample_size, path)
        has_vae = (index.get("vae") or [None])[0] is not None or (os.path.isdir(path) and (Path(path) / "vae").is_dir())
        self.vae = (
            AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=frozen_dtype, **kwargs)
            if has_vae
            else None
        )
        self.scheduler = load_scheduler(path, kwargs)
        self.frozen_dtype = frozen_dtype
        self.adapters_active = True  # False inside reference()

        for module in (self.text_encoder, self.unet, self.vae):
            if module is not None:
                module.requires_grad_(False).eval()
        check_lora_targets(self.unet, list(lora.target_modules))
        self.unet.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                init_lora_weights="gaussian",  # lora_B = 0: step 0 reproduces the pretrained model
                target_modules=list(lora.target_modules),
            )
        )
        for parameter in self.lora_parameters():
            parameter.data = parameter.data.float()  # trainable parameters in fp32, whatever the frozen dtype
        self.lora_row_mask = LoraRowMask(self.unet)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float().clone(), persistent=False)
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.prediction_type = self.scheduler.config.prediction_type  # what the UNet outputs; predict_noise → ε̂

    # ---- shapes ------------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def text_hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.unet.named_parameters() if "lora_" in name]

    def lora_state_dict(self) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    # ---- computations ------------------------------------------------------------------------------------------
    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps.clone().long()

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        return alpha_bar(self.alphas_cumprod, timesteps, self.final_alpha_cumprod)

    def transition_step(self, t: Tensor, t_prev: Tensor, eta: float) -> TransitionStep:
        """The sampler steps t → t_prev (per-sample (B,) timesteps) as the objectives see them: DDIM-η on ᾱ."""
        return TransitionStep.of(DDPMKernel(eta), self.alpha_bar(t), self.alpha_bar(t_prev))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states (B, L, D), padded to the tokenizer's max length as SD does."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.unet.device))[0]

    def predict_noise(
        self,
        x: Tensor,
        t: Tensor,
        prompt_embeds: Tensor,
        negative_embeds: Tensor,
        guidance_scale: float,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """CFG-combined ε̂ = ε_u + w·(ε_c − ε_u) in fp32, one UNet call on the batch [uncond; cond] (2B).

        The UNet's output is read as the scheduler's ``prediction_type`` says (ε, v or x̂0) and returned as ε̂, so all
        transition math downstream is ε-based. ``lora_rows`` (B,) bool: the LoRA acts only on these rows; the others
        get the pretrained policy's ε̂^#.
        """
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        output = self.guided_output(x, t, prompt_embeds, negative_embeds, guidance_scale, lora_rows)
        return epsilon_from_model_output(output, x.float(), self.alpha_bar(t), self.prediction_type)

    def guided_output(
        self,
        x: Tensor,
        t: Tensor,
        prompt_embeds: Tensor,
        negative_embeds: Tensor,
        guidance_scale: float,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """The CFG-combined raw UNet output (ε, v or x̂0, as ``prediction_type`` says) in fp32; t is (B,)."""
        if guidance_scale == 1.0:
            with self.lora_on_rows(lora_rows):
                return self.unet(x.to(self.frozen_dtype), t, encoder_hidden_states=prompt_embeds).sample.float()
        with self.lora_on_rows(None if lora_rows is None else torch.cat([lora_rows, lora_rows])):
            out = self.unet(
                torch.cat([x, x]).to(self.frozen_dtype),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
            ).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def lora_on_rows(self, rows_on: Tensor | None) -> AbstractContextManager:
        """The LoRA on the rows where ``rows_on`` is True only (:mod:`gflowdiff.diffusion.adapter_rows`); nothing to
        do when every row has it."""
        return nullcontext() if all_rows(rows_on) else self.lora_row_mask.only(rows_on.to(self.unet.device))

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Run the pretrained policy P_F^#: the same UNet with its LoRA adapters disabled."""
        self.unet.disable_adapters()
        self.adapters_active = False
        try:
            yield
        finally:
            self.unet.enable_adapters()
            self.adapters_active = True

    def should_merge_lora(self, merge: bool | None) -> bool:
        """``None`` (auto): merge only when the frozen weights are fp32, where W + ΔW rounds like the unmerged sum.
        In bf16 the merged weight is rounded to W's bf16 grid, which can erase a young LoRA's small ΔW."""
        return self.frozen_dtype == torch.float32 if merge is None else merge

    @contextmanager
    def merged_lora(self) -> Iterator[None]:
        """Inference with each LoRA update folded into its base weight (one matmul per layer instead of three).

        The original weight tensors are put back afterwards, bit for bit: no subtract-back rounding drift over
        thousands of steps. Without gradients only (the merged weights are not the trained parameters).
        """
        from peft.tuners.lora import LoraLayer

        if not self.adapters_active or torch.is_grad_enabled():
            yield  # the pretrained policy needs no merge; training passes keep the LoRA branch
            return
        saved = []
        for layer in self.unet.modules():
            if not isinstance(layer, LoraLayer):
                continue
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters if name in layer.lora_A)
            saved.append((base, base.weight.data))
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        self.unet.disable_adapters()  # the LoRA branch now lives in the weights
        try:
            yield
        finally:
            self.unet.enable_adapters()
            for base, original in saved:
                base.weight.data = original

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1], fp32. The clamp zeroes gradients of saturated pixels, as the reference does."""
        if self.vae is None:  # pixel-space model: the state is the image in [-1, 1]
            images = latents.float()
        else:
            scaled = latents.to(self.frozen_dtype) / self.vae.config.scaling_factor
            images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)
