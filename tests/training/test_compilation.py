"""Compiled networks (``--model.performance.compile``) compute the same loss, gradients and rollouts as eager ones. The
CPU tests use the ``aot_eager_decomp_partition`` backend: inductor's graph capture, decompositions and autograd
partitioning, without its (slow on CPU) code generation. (Plain ``aot_eager`` fails on batch-1 decodes:
native_group_norm on a non-contiguous view, pytorch#186414.)"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from gflowdiff.diffusion.sampling import sample_rollout
from gflowdiff.objectives import ResidualNablaDB

COMPILE_ON_CPU = [
    "--model.performance.compile",
    "true",
    "--model.performance.compile_backend",
    "aot_eager_decomp_partition",
]


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Compiled graphs are cached per code object, not per module instance: no other test file sees this file's."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_option_compiles_in_place_and_keeps_parameter_names(tiny_sd_path):
    from gflowdiff.evaluation.evaluator import EvaluationConfig
    from gflowdiff.rewards import DigitClassifierReward
    from gflowdiff.training.module import GFlowDiffModule
    from gflowdiff.training.performance import PerformanceConfig

    eager = GFlowDiffModule(
        ResidualNablaDB(),
        DigitClassifierReward(),
        str(tiny_sd_path),
        evaluation=EvaluationConfig(log_images_every_n_steps=0),
    )
    module = GFlowDiffModule(
        ResidualNablaDB(),
        DigitClassifierReward(),
        str(tiny_sd_path),
        evaluation=EvaluationConfig(log_images_every_n_steps=0),
        performance=PerformanceConfig(compile=True, compile_scope="blocks"),
    )
    # scope "blocks": every attention and ResNet block of the UNet is compiled, not the UNet as a whole
    blocks = [m for m in module.policy.unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]
    assert len(blocks) >= 4 and all(m._compiled_call_impl is not None for m in blocks)
    assert module.policy.unet._compiled_call_impl is None and module.flow_head._compiled_call_impl is not None
    assert eager.policy.unet._compiled_call_impl is None
    assert module.state_dict().keys() == eager.state_dict().keys()  # checkpoints load either way


def test_unknown_compile_backend_names_the_option(tiny_sd_path):
    from gflowdiff.cli import main
    from tests.training.test_module import tiny_fit_args

    args = [*tiny_fit_args(tiny_sd_path, tiny_sd_path.parent / "unused"), "--model.performance.compile", "true"]
    # checked before any loading: a missing model folder is not reached
    args += [
        "--model.pretrained_model",
        str(tiny_sd_path.parent / "missing"),
        "--model.performance.compile_backend",
        "inductr",
    ]
    with pytest.raises(
        ValueError, match=r"--model.performance.compile_backend: unknown backend 'inductr'; known: .*inductor"
    ):
        main(args)


@pytest.mark.slow
def test_fit_with_compile_logs_the_eager_runs_losses_and_metrics(tiny_sd_path, tmp_path):
    """``gflowdiff fit --model.performance.compile true``, residual ∇-DB in adjacent pairs: two optimizer steps
    (rollouts, the stacked passes with the LoRA masked per row, validation, checkpoints) log the eager fused run's
    losses, rewards and validation metrics. (The compiled fused structure is checked by tests/training/test_ddp.py's
    opt-in compiled test.)

    Not the weights: compiled kernels reassociate fp32 sums (~1e-5 relative in the loss), and Adam turns the sign of
    a near-zero gradient entry into a full ±lr step, so zero-initialised weights differ by a few % after two steps.
    """
    from gflowdiff.cli import main
    from tests.training.test_module import tiny_fit_args

    pairs = ["--model.objective.init_args.adjacent_pairs", "true"]
    fused, stacked = (["--model.objective.init_args.pass_structure", name] for name in ("fused", "stacked"))
    eager = main([*tiny_fit_args(tiny_sd_path, tmp_path / "eager"), *pairs, *fused])
    compiled = main([*tiny_fit_args(tiny_sd_path, tmp_path / "compiled"), *pairs, *stacked, *COMPILE_ON_CPU])
    policy = compiled.model.policy
    assert policy.unet._compiled_call_impl is not None and counters["stats"]["calls_captured"] > 0
    assert compiled.trainer.global_step == eager.trainer.global_step == 2
    logged = [k for k in eager.trainer.callback_metrics if k.startswith(("objective/", "reward/", "val/"))]
    assert "objective/reverse_loss" in logged and "val/reward_mean" in logged
    for key in logged:
        expected = eager.trainer.callback_metrics[key]
        torch.testing.assert_close(compiled.trainer.callback_metrics[key], expected, rtol=1e-3, atol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "compiled" / "ckpt").glob("*.ckpt")) == sorted(
        p.name for p in (tmp_path / "eager" / "ckpt").glob("*.ckpt")
    )

    # The LoRA mask acts inside the compiled graph: after 2 steps the LoRA is too small for the metrics above to tell,
    # so with a random live LoRA (and flow head output), the compiled stacked loss must equal the eager fused loss.
    generator = torch.Generator().manual_seed(0)
    live = dict(eager.model.named_parameters())
    with torch.no_grad():
        for name, p in compiled.model.named_parameters():
            if "lora_B" in name or (name.startswith("flow_head") and "conv_out" in name):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
                live[name].copy_(p)
    rollout = sample_rollout(eager.model.policy, ["a cat", "a cow"], eager.model.reward, eager.model.sampler, generator)
    chunk = eager.model.objective.transitions(rollout, torch.Generator().manual_seed(1))
    losses = [
        float(run.model.objective.loss(chunk, run.model.context(torch.Generator().manual_seed(2))).loss.detach())
        for run in (eager, compiled)
    ]
    policy, guidance = eager.model.policy, eager.model.sampler.guidance_scale
    with torch.no_grad():  # the LoRA moves ε̂ on these rows: a mask that failed would change the prior's scores
        tuned = policy.kernel_output(chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, guidance)
        with policy.reference():
            pretrained = policy.kernel_output(chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, guidance)
    assert (tuned - pretrained).abs().max() > 1e-2
    assert compiled.model.objective.pass_structure == "stacked" and eager.model.objective.pass_structure == "fused"
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), losses

    # a variant compiles for its first batch size, then once more for every other size (automatic dynamic shapes)
    graphs = []
    with torch.no_grad():
        for batch_size in (3, 5, 7):
            embeds = policy.encode_prompts(["a cat"] * batch_size)
            latents = torch.randn(batch_size, policy.latent_channels, policy.latent_size, policy.latent_size)
            policy.kernel_output(latents, torch.full((batch_size,), 500), embeds, embeds, 3.0)
            policy.decode(latents)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2], graphs
