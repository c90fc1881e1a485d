"""The model adapters reproduce their families' diffusers pipelines: prompts encoded as ``encode_prompt`` does, the
CFG-combined denoiser output of the pipeline's own ``__call__`` (its denoiser call captured by a hook), the decoded
image, and a LoRA exported by the adapter that ``load_lora_weights`` loads back into the pipeline. Also: choosing the
adapter by model_index.json, and the text encoders' offloading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gflowdiff.diffusion.adapters import (
    Conditioning,
    StableDiffusion3Adapter,
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    adapter_for,
    load_adapter,
)

FAMILIES = {  # fixture, adapter, pipeline class
    "sd": ("tiny_sd_path", StableDiffusionAdapter, "StableDiffusionPipeline"),
    "sdxl": ("tiny_sdxl_path", StableDiffusionXLAdapter, "StableDiffusionXLPipeline"),
    "sd3": ("tiny_sd3_path", StableDiffusion3Adapter, "StableDiffusion3Pipeline"),
}
PROMPTS = ["a cat", "two red dogs"]
SD3_T5_LENGTH = 12  # a short T5 part keeps the tiny SD3 fast; the pipeline is called with the same length
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def family_path(request, family: str):
    return request.getfixturevalue(FAMILIES[family][0])


def load_pair(request, family: str):
    """(adapter, pipeline) of the same tiny folder."""
    import diffusers

    fixture, adapter_class, pipeline_name = FAMILIES[family]
    path = request.getfixturevalue(fixture)
    options = {"max_sequence_length": SD3_T5_LENGTH} if family == "sd3" else {}
    adapter = adapter_class(str(path), **options)
    return adapter, getattr(diffusers, pipeline_name).from_pretrained(path)


def pipeline_call_options(family: str) -> dict:
    return {"max_sequence_length": SD3_T5_LENGTH} if family == "sd3" else {}


def sd3_prompts(family: str) -> dict:
    """SD3's encode_prompt takes prompt_2 and prompt_3 without defaults (None: the same prompts)."""
    return {"prompt_2": None, "prompt_3": None} if family == "sd3" else {}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pipeline_encoding(pipe, family: str, prompts: list[str]):
    """(cond, uncond) as the pipeline's ``encode_prompt`` returns them, with CFG and no negative prompt."""
    if family == "sd":
        embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
        return Conditioning(embeds), Conditioning(negative)
    options = pipeline_call_options(family) | sd3_prompts(family)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, **options
    )
    return Conditioning(embeds, pooled), Conditioning(negative, negative_pooled)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encode_prompts_equals_the_pipeline_encode_prompt(request, family):
    adapter, pipe = load_pair(request, family)
    cond, uncond = adapter.encode_prompts(PROMPTS), adapter.unconditional(len(PROMPTS))
    expected_cond, expected_uncond = pipeline_encoding(pipe, family, PROMPTS)
    for ours, theirs in ((cond, expected_cond), (uncond, expected_uncond)):
        assert ours.embeds.shape == theirs.embeds.shape
        torch.testing.assert_close(ours.embeds, theirs.embeds, **FP32)
        if family != "sd":
            torch.testing.assert_close(ours.pooled, theirs.pooled, **FP32)
    print(f"{family}: encode max |Δ| {max_difference(cond.embeds, expected_cond.embeds):.2e}")
    assert max_difference(cond.embeds[0], cond.embeds[1]) > 0  # the prompts matter
    if family == "sdxl":  # SDXL-base's force_zeros_for_empty_prompt: the unconditional branch is zeros
        assert not uncond.embeds.any() and not uncond.pooled.any()
        assert cond.extra["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # 8 latents × VAE factor 2
    if family == "sd3":  # 16 CLIP tokens (the tiny tokenizer's length) + the T5 part
        assert cond.embeds.shape == (2, 16 + SD3_T5_LENGTH, 32) and cond.pooled.shape == (2, 32)


class FirstDenoiserCall:
    """A forward hook keeping the first call's inputs and output of a pipeline's UNet / transformer."""

    def __init__(self, module):
        self.args = self.kwargs = self.output = None
        self.handle = module.register_forward_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs, output):
        if self.output is None:
            self.args, self.kwargs = args, kwargs
            self.output = (output[0] if isinstance(output, tuple) else output.sample).detach().clone()


def captured_pipeline_step(pipe, family: str, guidance_scale: float, prompts=PROMPTS):
    """The pipeline's first denoiser call in ``__call__``: (x, t, CFG-combined output), x and t of the cond half."""
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    hook = FirstDenoiserCall(denoiser)
    generator = torch.Generator().manual_seed(0)
    pipe(
        prompts,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="latent",
        **pipeline_call_options(family),
    )
    hook.handle.remove()
    x = hook.kwargs["hidden_states"] if family == "sd3" else hook.args[0]  # [uncond; cond], after scale_model_input
    t = hook.kwargs["timestep"] if family == "sd3" else hook.args[1]
    out_uncond, out_cond = hook.output.chunk(2)
    batch = len(prompts)
    t = t.expand(2 * batch) if t.dim() == 0 else t
    return x[batch:], t[batch:], out_uncond + guidance_scale * (out_cond - out_uncond)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_denoise_with_cfg_equals_the_pipeline_call(request, family):
    adapter, pipe = load_pair(request, family)
    x, t, expected = captured_pipeline_step(pipe, family, guidance_scale=4.5)
    cond, uncond = adapter.encode_prompts(PROMPTS), adapter.unconditional(len(PROMPTS))
    with torch.no_grad():
        out = adapter.denoise(x, t, cond, uncond, guidance_scale=4.5)
        plain = adapter.denoise(x, t, cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, **FP32)
    print(f"{family}: denoise (CFG 4.5) max |Δ| {max_difference(out, expected):.2e}")
    assert max_difference(out, plain) > 1e-3  # guidance changed the output: the comparison saw both branches
    if family == "sd3":  # the transformer's timestep is σ·1000, the scheduler's first σ (shifted) for 2 steps
        torch.testing.assert_close(adapter.timestep(adapter.sigmas(2)[0]).expand(2), t.float(), **FP32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_equals_the_pipeline_image(request, family):
    adapter, pipe = load_pair(request, family)
    options = {"num_inference_steps": 2, "guidance_scale": 3.0, **pipeline_call_options(family)}
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **options).images
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **options).images
    with torch.no_grad():
        decoded = adapter.decode(latents)
    torch.testing.assert_close(decoded, image, **FP32)
    print(f"{family}: decode max |Δ| {max_difference(decoded, image):.2e}")


def perturb_lora(adapter, scale: float = 0.05) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_lora_loads_into_the_pipeline(request, tmp_path, family):
    adapter, _ = load_pair(request, family)
    adapter.add_lora(rank=4, alpha=8.0)  # alpha / rank = 2: the export folds it into lora_B
    layers = {name.rsplit(".lora_A", 1)[0] for name, _ in adapter.denoiser.named_parameters() if ".lora_A" in name}
    assert layers and {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in layers} >= {"to_out.0"}
    assert {name.rsplit(".", 1)[-1] for name in layers} >= {"to_q", "to_k", "to_v"}
    perturb_lora(adapter)
    exported = adapter.export_lora(adapter.lora_state_dict(), tmp_path / "lora")
    assert exported.name == "pytorch_lora_weights.safetensors"

    _, pipe = load_pair(request, family)  # a fresh pipeline
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, loaded = captured_pipeline_step(pipe, family, guidance_scale=4.5)
    cond, uncond = adapter.encode_prompts(PROMPTS), adapter.unconditional(len(PROMPTS))
    with torch.no_grad():
        ours = adapter.denoise(x, t, cond, uncond, guidance_scale=4.5)
        adapter.denoiser.disable_adapters()
        pretrained = adapter.denoise(x, t, cond, uncond, guidance_scale=4.5)
        adapter.denoiser.enable_adapters()
    assert max_difference(ours, pretrained) > 1e-3  # the LoRA matters at this scale
    torch.testing.assert_close(loaded, ours, **FP32)
    print(f"{family}: LoRA loaded vs adapter max |Δ| {max_difference(loaded, ours):.2e}")


# ---- choosing the adapter ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_chosen_by_model_index(request, family):
    path = family_path(request, family)
    expected = FAMILIES[family][1]
    assert adapter_for(path) is expected and adapter_for(str(path)) is expected
    assert adapter_for(json.loads((path / "model_index.json").read_text())) is expected
    assert adapter_for({"_class_name": "Anything"}, adapter="stable_diffusion_xl") is StableDiffusionXLAdapter
    assert adapter_for(path, adapter="StableDiffusion3Adapter") is StableDiffusion3Adapter


def test_embedded_digits_and_a_folder_without_class_name_are_stable_diffusion(tiny_sd_path):
    assert adapter_for("embedded:digits") is StableDiffusionAdapter
    assert adapter_for({"unet": ["diffusers", "UNet2DConditionModel"]}) is StableDiffusionAdapter
    adapter = load_adapter("embedded:digits")  # pixel space: no VAE, the state is the image in [-1, 1]
    assert adapter.vae is None and adapter.latent_channels == 1 and adapter.image_size == 8
    assert torch.equal(adapter.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0])), torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_an_unknown_pipeline_class_is_refused_naming_the_option_and_the_known_classes(tiny_sd_path, tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text()) | {"_class_name": "FluxPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="--model.pretrained_model") as error:
        adapter_for(folder)
    for name in ("'FluxPipeline'", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="--model.adapter: unknown adapter 'flux'; known: stable_diffusion,"):
        adapter_for(folder, adapter="flux")


def test_adapter_conventions(request):
    sd, sdxl, sd3 = (FAMILIES[f][1](str(family_path(request, f))) for f in ("sd", "sdxl", "sd3"))
    assert (sd.kernel_family, sdxl.kernel_family, sd3.kernel_family) == ("diffusion", "diffusion", "flow")
    assert (sd.time_convention, sd3.time_convention) == ("discrete", "sigma")
    assert (sd.prediction_type, sdxl.prediction_type, sd3.prediction_type) == ("epsilon", "epsilon", "velocity")
    assert (sdxl.latent_channels, sdxl.latent_size, sd3.latent_channels, sd3.latent_size) == (4, 8, 16, 8)
    assert sd3.num_train_timesteps == sdxl.num_train_timesteps == 1000
    assert sd3.max_sequence_length == 256  # with a T5 encoder and no max_sequence_length: the pipeline's default
    assert sd3.denoiser is sd3.transformer and sdxl.denoiser is sdxl.unet
    assert sd3.default_lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


# ---- SD3 without T5 (and without a VAE) ----------------------------------------------------------------------------
@pytest.fixture
def sd3_without_t5(tiny_sd3_path, tmp_path):
    """The tiny SD3 with ``text_encoder_3``, ``tokenizer_3`` and ``vae`` null, as gflowdiff's own flow models."""
    folder = tmp_path / "sd3_clip_only"
    shutil.copytree(tiny_sd3_path, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3", "vae"))
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None], "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_sd3_without_t5_pads_zeros_of_the_clip_length(sd3_without_t5):
    from diffusers import StableDiffusion3Pipeline

    adapter = StableDiffusion3Adapter(str(sd3_without_t5))
    assert adapter.text_encoder_3 is None and adapter.vae is None
    assert adapter.max_sequence_length == adapter.tokenizer.model_max_length == 16  # not the pipeline's 256
    cond = adapter.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 16 + 16, 32) and not cond.embeds[:, 16:].any()  # CLIP rows, then zero rows
    # diffusers loads a null non-optional component only when it is passed as None explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_without_t5, text_encoder_3=None, tokenizer_3=None, vae=None)
    options = {"device": "cpu", "do_classifier_free_guidance": False, "max_sequence_length": 16}
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, **sd3_prompts("sd3"), **options)
    torch.testing.assert_close(cond.embeds, embeds, **FP32)
    torch.testing.assert_close(cond.pooled, pooled, **FP32)
    assert StableDiffusion3Adapter(str(sd3_without_t5), max_sequence_length=256).encode_prompts(["a"]).embeds.shape[1]
    assert adapter.image_size == 8  # pixel space


# ---- offloading the text encoders ----------------------------------------------------------------------------------
def test_offloaded_text_encoders_are_outside_the_module_tree(tiny_sd3_path):
    kept = StableDiffusion3Adapter(str(tiny_sd3_path), offload_text_encoders=False)
    offloaded = StableDiffusion3Adapter(str(tiny_sd3_path), offload_text_encoders=True)
    torch.testing.assert_close(offloaded.encode_prompts(PROMPTS).embeds, kept.encode_prompts(PROMPTS).embeds)
    assert not any(key.startswith("text_encoder") for key in offloaded.state_dict())
    kept.to("meta")
    offloaded.to("meta")  # what Lightning's module.to(accelerator) does
    assert all(encoder.device.type == "meta" for encoder in kept.text_encoders)
    assert len(offloaded.text_encoders) == 3
    assert all(encoder.device.type == "cpu" for encoder in offloaded.text_encoders)
    assert offloaded.transformer.device.type == "meta"


def test_offloaded_text_encoders_visit_the_denoiser_device_only_to_encode(tiny_sd3_path):
    """The denoiser is put on "meta", standing for an accelerator. Each encoder's ``.to`` is spied on: a move to
    meta is recorded but not done (so the encoder still computes, on the CPU), a move to the CPU is done. The events
    must be: every encoder to meta, the encoders' forward passes, every encoder back to the CPU."""
    adapter = StableDiffusion3Adapter(str(tiny_sd3_path), offload_text_encoders=True, max_sequence_length=8)
    adapter.transformer.to("meta")
    events = []
    for name in adapter.text_encoder_names:
        encoder = getattr(adapter, name)

        def spy(device, *args, _name=name, _encoder=encoder, **kwargs):
            events.append((_name, torch.device(device).type))
            return _encoder if torch.device(device).type == "meta" else type(_encoder).to(_encoder, device)

        encoder.to = spy
        encoder.register_forward_pre_hook(lambda module, args, _name=name: events.append((_name, "forward")))
    cond = adapter.encode_prompts(PROMPTS)
    names = adapter.text_encoder_names
    expected = [(n, "meta") for n in names] + [(n, "forward") for n in names] + [(n, "cpu") for n in names]
    assert events == expected
    assert cond.embeds.device.type == cond.pooled.device.type == "meta"  # handed to the denoiser's device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_text_encoders_on_a_real_accelerator(tiny_sd3_path):
    adapter = StableDiffusion3Adapter(str(tiny_sd3_path), offload_text_encoders=True, max_sequence_length=8).to("cuda")
    assert all(encoder.device.type == "cpu" for encoder in adapter.text_encoders)
    cond = adapter.encode_prompts(PROMPTS)
    assert cond.embeds.device.type == cond.pooled.device.type == "cuda"
    assert all(encoder.device.type == "cpu" for encoder in adapter.text_encoders)
    x = torch.randn(2, 16, 8, 8, device="cuda")
    assert adapter.denoise(x, torch.tensor(500.0), cond, adapter.unconditional(2), 4.5).isfinite().all()


# ---- Conditioning and dtypes ---------------------------------------------------------------------------------------
def test_conditioning_rows_index_and_concatenate():
    embeds, pooled, time_ids = torch.arange(24.0).view(3, 4, 2), torch.arange(6.0).view(3, 2), torch.ones(3, 6)
    cond = Conditioning(embeds, pooled, {"time_ids": time_ids})
    assert len(cond) == 3 and len(cond[0]) == 1 and len(cond[-1]) == 1 and len(cond[1:]) == 2
    assert torch.equal(cond[-1].embeds, embeds[2:]) and torch.equal(cond[torch.tensor([2, 0])].pooled, pooled[[2, 0]])
    both = Conditioning.cat([cond[:1], cond])  # e.g. the CFG batch [uncond; cond]
    assert len(both) == 4 and torch.equal(both.extra["time_ids"], torch.ones(4, 6))
    assert torch.equal(both.embeds[1:], embeds) and torch.equal(cond.repeat(2).pooled, torch.cat([pooled, pooled]))
    assert Conditioning(embeds).pooled is None and len(Conditioning.cat([Conditioning(embeds)] * 2)) == 6
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([cond, Conditioning(embeds)])
    with pytest.raises(ValueError, match="pooled has 2 rows, embeds has 3"):
        Conditioning(embeds, pooled[:2])


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_bf16_frozen_components_give_fp32_outputs_near_the_fp32_model(request, family):
    path = str(family_path(request, family))
    options = {"max_sequence_length": 8} if family == "sd3" else {}
    full = FAMILIES[family][1](path, **options)
    half = FAMILIES[family][1](path, frozen_dtype=torch.bfloat16, **options)
    half.add_lora(rank=2)
    assert half.denoiser.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in half.lora_parameters())
    torch.manual_seed(0)
    x, t = torch.randn(2, full.latent_channels, 8, 8), torch.tensor([700, 300])
    with torch.no_grad():
        outs = [a.denoise(x, t, a.encode_prompts(PROMPTS), a.unconditional(2), 5.0) for a in (full, half)]
        images = [a.decode(x) for a in (full, half)]
    assert outs[1].dtype == images[1].dtype == torch.float32
    scale = outs[0].abs().max()
    assert max_difference(*outs) < 0.1 * scale  # bf16 rounding only (7-bit mantissa through a few layers)
    assert max_difference(*images) < 0.1


def test_sd3_dynamic_shifting_uses_the_pipelines_resolution_dependent_shift(tiny_sd3_path, tmp_path):
    """A scheduler with ``use_dynamic_shifting`` (e.g. SD3.5 fine-tunes at other resolutions) needs the shift μ the
    pipeline computes from the latent's token count: the adapter's σ schedule equals the one the pipeline sampled."""
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path / "dynamic"
    shutil.copytree(tiny_sd3_path, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) | {"use_dynamic_shifting": True, "base_shift": 0.4, "max_shift": 1.3}
    config_file.write_text(json.dumps(config))
    adapter = StableDiffusion3Adapter(str(folder), max_sequence_length=SD3_T5_LENGTH)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe("a cat", num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0),
         **pipeline_call_options("sd3"))  # fmt: skip
    sampled = pipe.scheduler.sigmas.float()
    torch.testing.assert_close(adapter.sigmas(3), sampled)
    unshifted = StableDiffusion3Adapter(str(tiny_sd3_path), max_sequence_length=SD3_T5_LENGTH).sigmas(3)
    assert (adapter.sigmas(3) - unshifted).abs().max() > 1e-3  # the dynamic shift changed the schedule
