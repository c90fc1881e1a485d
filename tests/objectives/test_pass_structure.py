"""The fused and stacked pass structures compute the same loss and gradients as the reference code's structure
(docs/method.md §3.1), and sampling with the LoRA merged into the base weights is the unmerged sampler, restoring the
weights exactly."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.evaluation.evaluator import EvaluationConfig
from gflowdiff.objectives import NablaDB, ResidualNablaDB
from gflowdiff.objectives.flow_head import FlowHeadConfig
from gflowdiff.objectives.gradient_db.math import shared_state_order
from gflowdiff.rewards import DigitClassifierReward
from gflowdiff.training.module import GFlowDiffModule
from tests.objectives.reference_structure import reference_loss

SAMPLER = SamplerConfig(num_inference_steps=3, guidance_scale=3.0)
FLOW_HEAD = FlowHeadConfig(block_out_channels=[8, 16], norm_num_groups=4)
PROMPTS = ["a cat", "a red cow"]


def perturbed_module(tiny_sd_path, objective, sampler: SamplerConfig = SAMPLER, **options) -> GFlowDiffModule:
    """LoRA B and the flow head's output layer are zero at init; random values make every term of the loss live."""
    module = GFlowDiffModule(
        objective=objective,
        reward=DigitClassifierReward(),
        pretrained_model=str(tiny_sd_path),
        sampler=sampler,
        flow_head=FLOW_HEAD,
        evaluation=EvaluationConfig(log_images_every_n_steps=0),
        **options,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or (name.startswith("flow_head") and "conv_out" in name):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def loss_and_gradients(module, chunk, structure: str):
    """``reference``: the test oracle (reference_structure.py); else the objective's loss with that structure."""
    module.zero_grad(set_to_none=True)
    context = module.context(torch.Generator().manual_seed(1))
    if structure == "reference":
        output = reference_loss(module.objective, chunk, context)
    else:
        module.objective.pass_structure = structure
        output = module.objective.loss(chunk, context)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    return output, grads


@pytest.mark.parametrize(
    "objective",
    [
        ResidualNablaDB(timestep_fraction=1.0, trust_region_scale=0.3),
        ResidualNablaDB(timestep_fraction=1.0, transition_weighting="variance", pretrained_strength=0.7),
        ResidualNablaDB(timestep_fraction=1.0, reverse_loss_scale=0.0, use_flow_head=False),
        NablaDB(timestep_fraction=1.0, reward_guess_weighting="off"),
        ResidualNablaDB(adjacent_pairs=True, trust_region_scale=0.3),
        ResidualNablaDB(adjacent_pairs=True, reward_chunk_size=1),
    ],
    ids=[
        "residual",
        "variance-rho",
        "forward-only-no-flow-head",
        "nabla-db-no-guess",
        "adjacent-pairs",
        "reward-chunks",
    ],
)
@pytest.mark.parametrize("structure", ["fused", "stacked"])
def test_structure_equals_reference_structure(tiny_sd_path, objective, structure):
    torch.manual_seed(0)
    module = perturbed_module(tiny_sd_path, objective)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))
    assert chunk.is_terminal.any() and (~chunk.is_terminal).any()
    # transitions meet at a state (steps 1 → 2 of one trajectory): sharing is exercised wherever the guess is on
    assert len(shared_state_order(chunk.trajectory, chunk.step)[1]) > 0

    assert_structure_matches_reference(module, chunk, structure)


def assert_structure_matches_reference(module, chunk, structure: str) -> None:
    reference, reference_grads = loss_and_gradients(module, chunk, "reference")
    fused, fused_grads = loss_and_gradients(module, chunk, structure)

    assert float(reference.loss.detach()) > 0
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=0)
    for key, value in reference.metrics.items():
        torch.testing.assert_close(fused.metrics[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) > 0
    for name, grad in reference_grads.items():
        assert grad.abs().max() > 0, name
        # float32 sums in another order: measured ≤ 1.1e-4 of the tensor's norm, at 1 and at 2 threads (an element-wise
        # tolerance failed at 1 thread on a tiny element); a wrong term moves a gradient by O(1) of its norm
        error = float((fused_grads[name] - grad).norm() / grad.norm())
        assert error < 5e-4, f"{name}: relative gradient difference {error:.2e}"


def test_shared_state_order_puts_shared_states_first():
    # rows: (trajectory, step) = (0, 3), (0, 2), (1, 2), (0, 4), (1, 3), (1, 3)
    trajectory = torch.tensor([0, 0, 1, 0, 1, 1])
    step = torch.tensor([3, 2, 2, 4, 3, 3])
    order, source = shared_state_order(trajectory, step)
    # states that end another row's transition: (0, 3) ← (0, 2); (0, 4) ← (0, 3); (1, 3) twice ← (1, 2)
    assert order.tolist() == [0, 3, 4, 5, 1, 2]
    reordered = list(zip(trajectory[order].tolist(), step[order].tolist(), strict=True))
    assert len(source) == 4
    for k, i in enumerate(source.tolist()):  # row i's x' is row k's x
        assert reordered[i] == (reordered[k][0], reordered[k][1] - 1)
    assert shared_state_order(torch.tensor([0, 1]), torch.tensor([2, 3]))[1].numel() == 0  # other trajectories


def test_adjacent_pairs_save_decoder_passes_and_stacked_makes_one_unet_call(tiny_sd_path):
    """With adjacent pairs the fused and stacked structures decode (and differentiate the reward at) one state per
    pair fewer than the reference structure, which decodes at x and at x' of every transition; the stacked structure
    runs its three UNet passes as one call."""
    objective = ResidualNablaDB(adjacent_pairs=True)
    module = perturbed_module(tiny_sd_path, objective)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))  # 2 trajectories × the pair (2, 1)
    decoded_rows = []
    decode = module.policy.decode

    def counting_decode(latents):
        decoded_rows.append(len(latents))
        return decode(latents)

    module.policy.decode = counting_decode
    unet_rows = []
    module.policy.unet.register_forward_pre_hook(lambda unet, args: unet_rows.append(len(args[0])))
    counts, calls = {}, {}
    for structure in ["reference", "fused", "stacked"]:
        decoded_rows.clear()
        unet_rows.clear()
        loss_and_gradients(module, chunk, structure)
        counts[structure] = sum(decoded_rows)
        calls[structure] = unet_rows.copy()
    # reference: 4 transitions × (x and x') = 8 rows; fused and stacked: x' of all 4, x only of the 2 rows whose x is
    # not another row's x' = 6
    assert counts == {"reference": 8, "fused": 6, "stacked": 6}
    # UNet calls, rows doubled by CFG: the pretrained pass at x (4 transitions → 8 rows), the policy at x (8) and at
    # the 2 non-terminal x' (4); stacked makes them one call of 20 rows
    assert sorted(calls["fused"]) == sorted(calls["reference"]) == [4, 8, 8]
    assert calls["stacked"] == [20]


def test_unknown_pass_structure_names_the_option():
    with pytest.raises(ValueError, match="--model.objective.pass_structure must be fused or stacked"):
        ResidualNablaDB(pass_structure="fast")
    with pytest.raises(ValueError, match="--model.objective.reward_chunk_size must be >= 1"):
        ResidualNablaDB(reward_chunk_size=0)


@pytest.mark.parametrize("structure", ["fused", "stacked"])
def test_reward_chunk_size_bounds_each_decoder_call(tiny_sd_path, structure):
    """With reward_chunk_size 1, every VAE-decoder + reward pass sees one image, and all 6 states are still decoded
    (the loss is checked against the reference structure above)."""
    objective = ResidualNablaDB(adjacent_pairs=True, reward_chunk_size=1)
    module = perturbed_module(tiny_sd_path, objective)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, SAMPLER, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))
    decoded_rows = []
    decode = module.policy.decode
    module.policy.decode = lambda latents: decoded_rows.append(len(latents)) or decode(latents)
    loss_and_gradients(module, chunk, structure)
    assert decoded_rows == [1] * 6


@pytest.mark.parametrize("model", ["tiny-sd", "digits-conv-lora"])
def test_merged_lora_sampling_equals_unmerged_and_restores_weights(tiny_sd_path, model):
    from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig

    if model == "tiny-sd":
        policy = DiffusionPolicy(str(tiny_sd_path))
        prompts, steps, guidance = PROMPTS, 4, 3.0
    else:  # LoRA on ResNet convolutions too (the digits config)
        lora = LoRAConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
        policy = DiffusionPolicy("embedded:digits", lora=lora)
        prompts, steps, guidance = ["a handwritten digit"] * 3, 5, 1.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    before = {k: v.clone() for k, v in policy.unet.state_dict().items()}

    def sample(merge: bool, pretrained: bool = False):
        sampler = SamplerConfig(num_inference_steps=steps, guidance_scale=guidance, merge_lora=merge)
        with policy.reference() if pretrained else torch.no_grad():
            return sample_rollout(policy, prompts, None, sampler, torch.Generator().manual_seed(5)).latents

    unmerged, merged, pretrained = sample(False), sample(True), sample(False, pretrained=True)
    lora_effect = (unmerged - pretrained).abs().max()
    assert lora_effect > 1e-2  # the LoRA changes the samples, so agreement below is not vacuous
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4 * float(lora_effect))
    after = policy.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical weights after the merge
    assert policy.adapters_active


@pytest.mark.parametrize("structure", ["fused", "stacked"])
@pytest.mark.parametrize("family", ["tiny_sdxl_path", "tiny_sd3_path"])
def test_structures_equal_the_reference_on_sdxl_and_on_the_flow_sde(family, structure, request):
    """The same equality on SDXL (pooled embeddings and time ids in the stacked batch) and on SD3, a flow model
    sampled by the flow SDE (the LoRA masked per row inside a transformer)."""
    from gflowdiff.diffusion.policy import LoRAConfig

    torch.manual_seed(0)
    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, eta=0.7)
    objective = ResidualNablaDB(timestep_fraction=1.0, trust_region_scale=0.3)
    path = request.getfixturevalue(family)
    module = perturbed_module(path, objective, sampler, lora=LoRAConfig(target_modules=["to_q", "to_k", "to_v"]))
    assert module.policy.kernel_family == ("flow" if family == "tiny_sd3_path" else "diffusion")
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, sampler, torch.Generator().manual_seed(3))
    chunk = objective.transitions(rollout, torch.Generator().manual_seed(4))
    assert_structure_matches_reference(module, chunk, structure)
