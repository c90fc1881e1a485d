"""Channels-last networks (``--model.performance.channels_last``) compute the same loss, gradients and samples as
contiguous ones, and their trainable state is saved, exported and loaded like any other."""

from __future__ import annotations

from pathlib import Path

import torch

from gflowdiff.diffusion.policy import LoRAConfig, resolve_pretrained_path
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.evaluation.evaluator import EvaluationConfig
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.rewards import DigitClassifierReward
from gflowdiff.training.checkpointing import export_lora, lora_state_with_unit_scale, trainable_state
from gflowdiff.training.memory_layout import use_channels_last
from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.performance import PerformanceConfig
from tests.objectives.test_pass_structure import PROMPTS, SAMPLER, loss_and_gradients, perturbed_module


def is_channels_last(weight: torch.Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_gives_the_same_loss_gradients_and_samples(tiny_sd_path):
    objective = ResidualNablaDB(adjacent_pairs=True, trust_region_scale=0.3)
    module = perturbed_module(tiny_sd_path, objective)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))
    contiguous, contiguous_grads = loss_and_gradients(module, chunk, "fused")
    assert not is_channels_last(module.policy.unet.conv_in.weight)

    names = use_channels_last(module.policy, module.flow_head, module.reward)
    assert names == ["unet", "vae", "flow_head", "reward.classifier"]
    for network in (module.policy.unet, module.policy.vae.decoder, module.flow_head):
        convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert convolutions and all(is_channels_last(m.weight) for m in convolutions)
    channels_last, channels_last_grads = loss_and_gradients(module, chunk, "fused")
    resampled = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))

    # The same math, up to float round-off: the kernels sum in another order. Measured: loss 1.2e-5 relative, each
    # gradient within 1.4e-4 of its largest entry, latents within 1.1e-5; a layout mix-up would be off by O(1).
    assert float(contiguous.loss.detach()) > 0
    torch.testing.assert_close(channels_last.loss, contiguous.loss, rtol=1e-4, atol=0)
    assert channels_last_grads.keys() == contiguous_grads.keys()
    for name, grad in contiguous_grads.items():
        torch.testing.assert_close(
            channels_last_grads[name], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()), msg=name
        )
    torch.testing.assert_close(resampled.latents, rollout.latents, rtol=1e-4, atol=1e-4)


def test_channels_last_module_trains_saves_and_exports(tmp_path):
    """The digits model's LoRA adapts 3×3 convolutions too, so some trainable tensors are channels-last themselves:
    they train, their checkpoint loads into a contiguous module, and the diffusers export (safetensors, which takes
    only contiguous tensors) holds the trained values, as diffusers loads them back."""

    def build(channels_last: bool) -> GFlowDiffModule:
        return GFlowDiffModule(
            objective=ResidualNablaDB(timestep_fraction=0.5),
            reward=DigitClassifierReward(),
            lora=LoRAConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]),
            sampler=SamplerConfig(num_inference_steps=3, guidance_scale=1.0),
            performance=PerformanceConfig(channels_last=channels_last),
            evaluation=EvaluationConfig(log_images_every_n_steps=0),
        )

    module = build(channels_last=True).to("cpu")  # .to keeps the layout
    lora_convs = {n: p for n, p in module.policy.unet.named_parameters() if "lora_A" in n and p.shape[-1] == 3}
    assert lora_convs and all(is_channels_last(p) for p in lora_convs.values())

    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    rollout = sample_rollout(module.policy, ["a digit"] * 2, module.reward, module.sampler, generator)
    chunk = module.objective.transitions(rollout, generator)
    module.objective.loss(chunk, module.context(generator)).loss.backward()
    before = {n: p.detach().clone() for n, p in lora_convs.items()}
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in lora_convs.items())

    contiguous = build(channels_last=False)
    contiguous.load_state_dict(trainable_state(module), strict=False)
    for name, value in trainable_state(module).items():
        loaded = contiguous.state_dict()[name]
        assert loaded.is_contiguous() and torch.equal(loaded, value), name

    weights = export_lora(module.policy, tmp_path / "lora")
    exported = exported_lora(weights)
    trained = lora_state_with_unit_scale(module.policy)
    assert sorted(exported) == sorted(trained)  # every trained tensor, the convolutions' included
    for name, value in trained.items():
        assert torch.equal(exported[name], value.contiguous()), name


def exported_lora(weights: Path) -> dict[str, torch.Tensor]:
    """The exported file loaded back as diffusers loads it (``load_lora_adapter`` into a fresh pretrained UNet), as
    peft state-dict keys."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(resolve_pretrained_path("embedded:digits"), subfolder="unet")
    unet.load_lora_adapter(str(weights.parent), weight_name=weights.name, prefix="unet", adapter_name="exported")
    return get_peft_model_state_dict(unet, adapter_name="exported")
