"""Compiled networks (``--model.compile``) compute the same loss, gradients and rollouts as eager ones. The CPU tests
use the ``aot_eager`` backend: the graph capture and autograd of inductor, without its (slow on CPU) code generation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from gflowdiff.compilation import compile_networks
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.sampling import sample_rollout
from tests.test_pass_structure import PROMPTS, SAMPLER, loss_and_gradients, perturbed_module


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_networks_give_the_eager_loss_gradients_and_rollout(tiny_sd_path, fresh_dynamo):
    torch.manual_seed(0)
    objective = ResidualNablaDB(adjacent_pairs=True, trust_region_scale=0.3)
    module = perturbed_module(tiny_sd_path, objective)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))
    eager, eager_grads = loss_and_gradients(module, chunk, "fused")

    names = compile_networks(module.policy, module.flow_head, module.reward, backend="aot_eager")
    assert names[:3] == ["unet", "vae.decoder", "flow_head"] and any(n.startswith("reward.") for n in names)
    compiled, compiled_grads = loss_and_gradients(module, chunk, "fused")
    assert counters["stats"]["unique_graphs"] > 0  # the passes really ran through compiled graphs

    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
    # the rollout (no grad, LoRA on) and the pretrained pass (adapters off) are variants of the same compiled UNet
    again = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.latents, rollout.latents, rtol=1e-5, atol=1e-6)

    # a new batch size compiles a variant once more, with a dynamic batch that then serves every other size
    policy, graphs = module.policy, []
    with torch.no_grad():
        for batch_size in (3, 5, 7):
            embeds = policy.encode_prompts(["a cat"] * batch_size)
            latents = torch.randn(batch_size, policy.latent_channels, policy.latent_size, policy.latent_size)
            policy.predict_noise(latents, torch.full((batch_size,), 500), embeds, embeds, SAMPLER.guidance_scale)
            policy.decode(latents)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2], graphs


def test_compile_option_compiles_in_place_and_keeps_parameter_names(tiny_sd_path):
    from gflowdiff.module import GFlowDiffModule
    from gflowdiff.rewards import DigitClassifierReward

    eager = GFlowDiffModule(ResidualNablaDB(), DigitClassifierReward(), str(tiny_sd_path), log_images_every_n_steps=0)
    module = GFlowDiffModule(
        ResidualNablaDB(),
        DigitClassifierReward(),
        str(tiny_sd_path),
        log_images_every_n_steps=0,
        compile=True,
        compile_scope="blocks",
    )
    # scope "blocks": every attention and ResNet block of the UNet is compiled, not the UNet as a whole
    blocks = [m for m in module.policy.unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]
    assert len(blocks) >= 4 and all(m._compiled_call_impl is not None for m in blocks)
    assert module.policy.unet._compiled_call_impl is None and module.flow_head._compiled_call_impl is not None
    assert eager.policy.unet._compiled_call_impl is None
    assert module.state_dict().keys() == eager.state_dict().keys()  # checkpoints load either way
