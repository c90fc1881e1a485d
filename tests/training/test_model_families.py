"""`gflowdiff fit` on each model family's tiny random pipeline (SDXL: a diffusion UNet with pooled embeddings and
time ids; SD3: a flow-matching transformer sampled by the flow SDE), and on the embedded flow-matching digits model:
two steps of every objective that applies, the LoRA exported in the family's format, and a clear refusal, before
any loading, of an objective whose math is written for another kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gflowdiff.cli import main

REPO = Path(__file__).resolve().parents[2]
ATTENTION = "[to_q,to_k,to_v,to_out.0]"
DIFFUSION_OBJECTIVES = ["residual_nabla_db", "nabla_db", "ddpo", "refl", "draft", "db", "residual_db"]
FLOW_OBJECTIVES = ["residual_nabla_db", "nabla_db", "ddpo", "refl", "draft"]


def two_steps(config: str, model: str, root: Path, extra: list[str] = ()) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "digits" / f"{config}.yaml"),
        "--model.pretrained_model", model,
        "--model.lora.target_modules", ATTENTION,
        "--model.sampler.num_inference_steps", "3",
        *([] if config in ("refl", "draft") else ["--model.objective.init_args.timestep_fraction", "0.5"]),
        "--model.optimization.train_batch_size", "4",
        "--model.performance.channels_last", "false",
        "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.callbacks.init_args.dirpath", str(root / "ckpt"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def objective_args(config: str) -> list[str]:
    """Small warm-ups and inner loops: the point is that every code path runs on the family."""
    if config == "residual_nabla_db":
        return ["--model.objective.init_args.value_warmup_trajectories", "8"]
    return []


def fit_two_steps(config: str, model: str, root: Path, monkeypatch, extra: list[str] = ()):
    monkeypatch.chdir(root)
    args = two_steps(config, model, root, [*objective_args(config), *extra])
    cli = main(args)
    assert cli.trainer.global_step == 2
    assert (root / "ckpt" / "last.ckpt").is_file()
    return cli


@pytest.mark.parametrize("config", DIFFUSION_OBJECTIVES)
def test_every_objective_trains_two_steps_on_sdxl(config, tiny_sdxl_path, tmp_path, monkeypatch):
    cli = fit_two_steps(config, str(tiny_sdxl_path), tmp_path, monkeypatch)
    assert type(cli.model.policy.adapter).__name__ == "StableDiffusionXLAdapter"
    assert cli.model.policy.kernel_family == "diffusion"


@pytest.mark.parametrize("config", FLOW_OBJECTIVES)
def test_flow_objectives_train_two_steps_on_sd3(config, tiny_sd3_path, tmp_path, monkeypatch):
    cli = fit_two_steps(config, str(tiny_sd3_path), tmp_path, monkeypatch, ["--model.sampler.eta", "0.7"])
    policy = cli.model.policy
    assert type(policy.adapter).__name__ == "StableDiffusion3Adapter" and policy.kernel_family == "flow"
    trained = [p for name, p in policy.transformer.named_parameters() if "lora_B" in name]
    assert trained and any(torch.count_nonzero(p) for p in trained)  # the LoRA moved


def test_draft_lv_renoises_with_the_flow_noising_kernel_on_sd3(tiny_sd3_path, tmp_path, monkeypatch):
    """DRaFT-LV re-noises x_T with the flow model's P_B (kernels.FlowSDEKernel.backward_sample) and trains."""
    cli = fit_two_steps("draft", str(tiny_sd3_path), tmp_path, monkeypatch,
                        ["--model.sampler.eta", "0.7", "--model.objective.init_args.lv_samples", "2"])  # fmt: skip
    trained = [p for name, p in cli.model.policy.transformer.named_parameters() if "lora_B" in name]
    assert any(torch.count_nonzero(p) for p in trained)


@pytest.mark.parametrize("config", ["refl", "draft"])
def test_reward_backprop_trains_through_the_euler_ode_on_sd3(config, tiny_sd3_path, tmp_path, monkeypatch):
    """--model.sampler.eta 0 on a flow model is the Euler ODE (no density): ReFL and DRaFT train through it, and the
    rollout carries no log-probs."""
    from gflowdiff.diffusion.kernels import EulerODE

    cli = fit_two_steps(config, str(tiny_sd3_path), tmp_path, monkeypatch, ["--model.sampler.eta", "0"])
    policy = cli.model.policy
    times, next_times = policy.step_times(3)
    assert isinstance(policy.transition_step(times, next_times, cli.model.sampler.eta).kernel, EulerODE)
    trained = [p for name, p in policy.transformer.named_parameters() if "lora_B" in name]
    assert any(torch.count_nonzero(p) for p in trained)


def test_draft_trains_through_deterministic_ddim_on_sdxl(tiny_sdxl_path, tmp_path, monkeypatch):
    """--model.sampler.eta 0 on a diffusion model is DDIM η = 0 (kernels.DDIMODE)."""
    from gflowdiff.diffusion.kernels import DDIMODE

    cli = fit_two_steps("draft", str(tiny_sdxl_path), tmp_path, monkeypatch, ["--model.sampler.eta", "0"])
    policy = cli.model.policy
    times, next_times = policy.step_times(3)
    assert isinstance(policy.transition_step(times, next_times, 0.0).kernel, DDIMODE)
    trained = [p for name, p in policy.unet.named_parameters() if "lora_B" in name]
    assert any(torch.count_nonzero(p) for p in trained)


def forbid_loading(monkeypatch, before: str) -> None:
    """Make loading the model fail: the refusal under test must come first."""
    from gflowdiff.diffusion import policy

    def no_loading(*args, **kwargs):
        raise AssertionError(f"the model was loaded before {before}")

    monkeypatch.setattr(policy.DiffusionPolicy, "__init__", no_loading)


@pytest.mark.parametrize("config", ["residual_nabla_db", "ddpo"])
def test_an_objective_needing_a_density_refuses_the_deterministic_sampler(config, tiny_sd3_path, tmp_path, monkeypatch):
    forbid_loading(monkeypatch, "the sampler was checked")
    with pytest.raises(ValueError, match=r"--model.sampler.eta 0 is the deterministic sampler.*--model.objective"):
        main(two_steps(config, str(tiny_sd3_path), tmp_path, ["--model.sampler.eta", "0"]))


@pytest.mark.parametrize("config", ["db", "residual_db"])
def test_an_objective_written_for_ddim_is_refused_on_a_flow_model(config, tiny_sd3_path, tmp_path, monkeypatch):
    forbid_loading(monkeypatch, "the objective's kernel was checked")
    with pytest.raises(ValueError, match=r"--model.objective \w+ runs on diffusion models; --model.pretrained_model"):
        main(two_steps(config, str(tiny_sd3_path), tmp_path))


def assert_loaded_lora_matches(policy, call_loaded, t: torch.Tensor) -> None:
    """The pipeline's denoiser with the exported LoRA loaded (``call_loaded(x, t, cond)``) equals gflowdiff's
    fine-tuned one, which two steps moved away from the pretrained one."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, policy.latent_channels, policy.latent_size, policy.latent_size, generator=generator)
    cond = policy.encode_prompts(["a handwritten digit 3", "a cat"])
    with torch.no_grad():
        tuned = policy.guided_output(x, t, cond, cond, 1.0)
        loaded = call_loaded(x, t, cond)
        with policy.reference():
            pretrained = policy.guided_output(x, t, cond, cond, 1.0)
    assert (tuned - pretrained).abs().max() > 1e-6  # two steps moved the LoRA
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)


def test_exported_sd3_lora_reproduces_the_fine_tuned_transformer(tiny_sd3_path, tmp_path, monkeypatch):
    """After fit, ``StableDiffusion3Pipeline.load_lora_weights(<run>/lora)`` gives the fine-tuned transformer."""
    from diffusers import StableDiffusion3Pipeline

    cli = fit_two_steps("residual_nabla_db", str(tiny_sd3_path), tmp_path, monkeypatch, ["--model.sampler.eta", "0.7"])
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    pipe.load_lora_weights(Path(cli.trainer.log_dir) / "lora")

    def call_loaded(x, t, cond):
        return pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
        ).sample

    assert_loaded_lora_matches(cli.model.policy, call_loaded, torch.tensor([800.0, 200.0]))


def test_exported_sdxl_lora_reproduces_the_fine_tuned_unet(tiny_sdxl_path, tmp_path, monkeypatch):
    """After fit, ``StableDiffusionXLPipeline.load_lora_weights(<run>/lora)`` gives the fine-tuned UNet (called with
    SDXL's pooled ``text_embeds`` and ``time_ids``)."""
    from diffusers import StableDiffusionXLPipeline

    cli = fit_two_steps("residual_nabla_db", str(tiny_sdxl_path), tmp_path, monkeypatch)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(Path(cli.trainer.log_dir) / "lora")

    def call_loaded(x, t, cond):
        added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample

    assert_loaded_lora_matches(cli.model.policy, call_loaded, torch.tensor([800, 200]))


def test_residual_nabla_db_trains_the_embedded_flow_model(tmp_path, monkeypatch):
    """configs/digits_flow/residual_nabla_db.yaml, two steps (a smaller warm-up): the flow path end to end."""
    monkeypatch.chdir(tmp_path)
    cli = main([
        "fit", "--config", str(REPO / "configs" / "digits_flow" / "residual_nabla_db.yaml"),
        "--model.objective.init_args.value_warmup_trajectories", "16",
        "--data.batch_size", "4", "--data.eval_batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.model.policy.kernel_family == "flow"
    assert torch.isfinite(torch.tensor(cli.trainer.logged_metrics["loss"]))
