"""One interface to a family of diffusers text-to-image models: load its components, encode prompts, one denoiser
call with classifier-free guidance, decode, and the LoRA's export in the family's diffusers format.

An adapter is an ``nn.Module`` holding the frozen components (``denoiser``, text encoders, optional ``vae``), loaded
with ``from_pretrained(path, subfolder=...)`` as the family's pipeline does. What differs between families lives in the
subclasses: how prompts become a :class:`Conditioning`, how the denoiser is called, the latent conventions of the VAE,
and what the model predicts (``prediction_type``) on which time axis (``time_convention``). The sampler's transition
kernel follows ``kernel_family``: "diffusion" (DDIM/DDPM math on ᾱ_t, SD and SDXL) or "flow" (rectified flow on σ,
SD3).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.conditioning import Conditioning  # noqa: F401 (part of the adapters' interface)
from gflowdiff.diffusion.loading import (
    PRETRAINED_OPTION,
    check_lora_targets,
    load_model_index,
    resolve_pretrained_path,
    square_sample_size,
)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name, what load_lora_weights looks for
OFFLOAD_DEVICE = torch.device("cpu")


def resolve_model_location(name: str, denoiser_subfolder: str | None = None) -> str:
    """An ``embedded:<name>`` model's folder, a local folder (checked to exist and, when ``denoiser_subfolder`` is
    given, to hold it), or a hub id passed through (policy.py's rules; SD's ``unet/`` check is policy.py's own)."""
    if name.startswith("embedded:") or denoiser_subfolder == "unet":
        return resolve_pretrained_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if denoiser_subfolder is not None and not (path / denoiser_subfolder).is_dir():
            raise FileNotFoundError(
                f"{PRETRAINED_OPTION}: {str(path)!r} is not a diffusers model folder (no {denoiser_subfolder}/ "
                "subfolder)"
            )
        return str(path)
    return resolve_pretrained_path(name)  # a hub id, or the "does not exist" error for a local-looking path


def fold_lora_scale(denoiser: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A peft LoRA state dict (keys as ``get_peft_model_state_dict`` writes them) with each layer's ``alpha / rank``
    folded into its ``lora_B``: loaders that read a file without alphas (diffusers' ``load_lora_weights``) use scale
    1, and then compute the same ΔW = (alpha / rank)·B·A."""
    from peft.tuners.lora import LoraLayer

    state = dict(state)
    for name, layer in denoiser.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter, scale in layer.scaling.items():
                key = f"{name}.lora_B.weight"
                if adapter in layer.lora_B and key in state and scale != 1.0:
                    state[key] = state[key] * scale
    return state


class ModelAdapter(nn.Module, ABC):
    """A family of diffusers text-to-image models behind gflowdiff's interface.

    Args:
        pretrained_model: a hub id, a local diffusers folder or ``embedded:<name>``.
        revision: the hub revision (branch, tag or commit).
        frozen_dtype: dtype of the frozen components (text encoders, denoiser, VAE).
        offload_text_encoders: keep the text encoders on the CPU, outside the module tree (``.to(device)`` leaves
            them there), and move them to the denoiser's device only inside :meth:`encode_prompts`. For large models
            (SDXL, SD3's T5-XXL), where they are needed only to encode prompts.
    """

    pipeline_class_name: ClassVar[str]  # the diffusers pipeline of this family, model_index.json's _class_name
    denoiser_subfolder: ClassVar[str]  # "unet" or "transformer"
    lora_layers_keyword: ClassVar[str]  # the pipeline's save_lora_weights argument for the denoiser's LoRA
    kernel_family: ClassVar[str]  # "diffusion" (ᾱ_t, DDIM/DDPM transitions) or "flow" (σ, rectified flow)
    time_convention: ClassVar[str]  # "discrete": integer t in [0, T); "sigma": timestep = σ·T, σ in [0, 1]
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_names: ClassVar[tuple[str, ...]]  # attribute names, in encoding order

    def __init__(
        self,
        pretrained_model: str,
        revision: str | None = None,
        frozen_dtype: torch.dtype = torch.float32,
        offload_text_encoders: bool = False,
    ):
        super().__init__()
        self.path = resolve_model_location(pretrained_model, self.denoiser_subfolder)
        self.revision = revision
        self.model_index = load_model_index(self.path, revision)
        self.frozen_dtype = frozen_dtype
        self.offload_text_encoders = offload_text_encoders

    # ---- loading helpers (subclasses' __init__) ----------------------------------------------------------------
    @property
    def load_kwargs(self) -> dict:
        return {"revision": self.revision} if self.revision else {}

    def has_component(self, name: str) -> bool:
        """Whether model_index.json names ``name`` (not ``[null, null]``); a local folder without a model index has
        the component when its subfolder exists."""
        if name in self.model_index:
            return (self.model_index[name] or [None])[0] is not None
        return os.path.isdir(self.path) and (Path(self.path) / name).is_dir()

    def component_class(self, name: str, default: str):
        """The class model_index.json names for ``name`` (a transformers or diffusers class), else ``default``."""
        import diffusers
        import transformers

        library, class_name = (self.model_index.get(name) or [None, None])[:2]
        module = diffusers if library == "diffusers" else transformers
        return getattr(module, class_name or default, None) or getattr(transformers, default)

    def load_tokenizer(self, name: str, default: str = "CLIPTokenizer"):
        return self.component_class(name, default).from_pretrained(self.path, subfolder=name, **self.load_kwargs)

    def load_text_encoder(self, name: str, default: str) -> nn.Module:
        encoder_class = self.component_class(name, default)
        encoder = encoder_class.from_pretrained(self.path, subfolder=name, dtype=self.frozen_dtype, **self.load_kwargs)
        return encoder.requires_grad_(False).eval()

    def load_diffusers(self, model_class, name: str) -> nn.Module:
        model = model_class.from_pretrained(
            self.path, subfolder=name, torch_dtype=self.frozen_dtype, **self.load_kwargs
        )
        return model.requires_grad_(False).eval()

    def load_vae(self) -> nn.Module | None:
        """The folder's AutoencoderKL, or None for a pixel-space model (``"vae": [null, null]``, no ``vae/``)."""
        from diffusers import AutoencoderKL

        return self.load_diffusers(AutoencoderKL, "vae") if self.has_component("vae") else None

    def set_text_encoder(self, name: str, encoder: nn.Module | None) -> None:
        """Store a text encoder: a registered submodule, or with ``offload_text_encoders`` a plain attribute on the
        CPU that ``.to()``, ``state_dict()`` and ``parameters()`` do not see."""
        if self.offload_text_encoders and encoder is not None:
            object.__setattr__(self, name, encoder.to(OFFLOAD_DEVICE))
        else:
            setattr(self, name, encoder)

    # ---- shapes and conventions --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that gets the LoRA (the UNet or the transformer)."""

    @property
    def device(self) -> torch.device:
        """Where the denoiser is: the device prompts are encoded for and the model runs on."""
        return next(self.denoiser.parameters()).device

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [encoder for name in self.text_encoder_names if (encoder := getattr(self, name, None)) is not None]

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def latent_size(self) -> int:
        """The side of the (square) latent the denoiser was trained at."""
        return square_sample_size(self.denoiser.config.sample_size, self.path)

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side: 2^(VAE blocks − 1); 1 in pixel space."""
        vae = getattr(self, "vae", None)
        return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    @abstractmethod
    def num_train_timesteps(self) -> int: ...

    @property
    @abstractmethod
    def prediction_type(self) -> str:
        """What the denoiser outputs: "epsilon", "v_prediction" or "sample" (SD, SDXL: the scheduler's), "velocity"
        (SD3: the rectified-flow velocity v ≈ ε − x0, not diffusers' "v_prediction")."""

    # ---- prompts -----------------------------------------------------------------------------------------------
    @contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """With ``offload_text_encoders``: the text encoders on the denoiser's device for the block, then back on the
        CPU (also after an error). Without it: nothing to do."""
        if not self.offload_text_encoders:
            yield
            return
        device = self.device
        for encoder in self.text_encoders:
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in self.text_encoders:
                encoder.to(OFFLOAD_DEVICE)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The denoiser's conditioning for each prompt, as the family's pipeline ``encode_prompt`` builds it, on the
        denoiser's device."""
        context = self.text_encoders_on_device() if self.text_encoders else nullcontext()
        with context:
            conditioning = self.encode(list(prompts))
        return conditioning.to(self.device)

    def unconditional(self, batch_size: int) -> Conditioning:
        """The conditioning of the CFG branch, as the pipeline builds it without a negative prompt: the empty prompt
        (SDXL with ``force_zeros_for_empty_prompt``: zeros)."""
        return self.encode_prompts([""] * batch_size)

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """``encode_prompts``' work, with the text encoders where they compute (tokens go to each encoder's
        device)."""

    # ---- the denoiser ------------------------------------------------------------------------------------------
    @abstractmethod
    def model_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """One denoiser call on the batch: x (B, C, H, W), t (B,) on the model's time axis, ``cond`` with B rows."""

    def denoise(
        self, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None = None, guidance_scale: float = 1.0
    ) -> Tensor:
        """The raw model output (``prediction_type``) in fp32, CFG-combined as out_u + w·(out_c − out_u) from one
        denoiser call on the batch [uncond; cond] (2B); ``guidance_scale`` 1 (or no ``uncond``) is one plain call.
        ``t`` is a scalar or (B,), on the model's ``time_convention`` axis (SD3: σ·1000)."""
        t = t.to(x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if guidance_scale == 1.0 or uncond is None:
            return self.model_output(x, t, cond).float()
        out = self.model_output(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).float()
        out_uncond, out_cond = out.chunk(2)  # (B, C, H, W) each
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    # ---- images ------------------------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1], fp32: z = latents / scaling + shift (SDXL-style ``latents_mean/std`` where the
        VAE config has them), then the VAE decoder. Without a VAE the state is the image in [-1, 1]."""
        vae = getattr(self, "vae", None)
        if vae is None:
            images = latents.float()
        else:
            config = vae.config
            z = latents.to(self.frozen_dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:  # the pipelines' convention: z = latents·std / scaling + mean
                view = (1, -1, 1, 1)
                z = z * torch.tensor(std).view(view).to(z) / config.scaling_factor + torch.tensor(mean).view(view).to(z)
            else:
                z = z / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
            images = vae.decode(z).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ---- LoRA --------------------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float = 8.0, target_modules: Sequence[str] | None = None) -> None:
        """A peft LoRA on the denoiser (Gaussian A, B = 0: the model is unchanged until trained), in fp32."""
        from peft import LoraConfig

        targets = list(target_modules or self.default_lora_targets)
        check_lora_targets(self.denoiser, targets)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        self.denoiser.add_adapter(config)
        for parameter in self.lora_parameters():
            parameter.data = parameter.data.float()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.denoiser.named_parameters() if "lora_" in name]

    def lora_state_dict(self, unit_scale: bool = True) -> dict[str, Tensor]:
        """The denoiser's LoRA (peft keys); ``unit_scale``: each layer's alpha / rank folded into its lora_B, as
        :meth:`export_lora` expects."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser)
        return fold_lora_scale(self.denoiser, state) if unit_scale else dict(state)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def export_lora(self, lora_state_dict: dict[str, Tensor], folder: str | Path) -> Path:
        """Write the denoiser's LoRA as the family's pipeline saves one (``save_lora_weights`` with
        ``unet_lora_layers`` / ``transformer_lora_layers``), so ``pipeline.load_lora_weights(folder)`` loads it.

        ``lora_state_dict`` has peft's keys and scale 1 (:meth:`lora_state_dict` gives it so: diffusers reads a file
        without alphas at alpha = rank). The keys stay peft's: diffusers' loaders read them as they are.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        layers = {key: value.detach().contiguous() for key, value in lora_state_dict.items()}  # safetensors: contiguous
        self.pipeline_class().save_lora_weights(
            folder, **{self.lora_layers_keyword: layers}, weight_name=LORA_WEIGHT_NAME
        )
        return folder / LORA_WEIGHT_NAME
