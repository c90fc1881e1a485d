"""The LightningModule and the CLI end to end on the tiny random SD pipeline: fit, checkpoint contents, resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from gflowdiff.cli import GFlowDiffCLI, cli_options, main
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.objectives.flow_head import FlowHead, FlowHeadConfig
from gflowdiff.rewards import DigitClassifierReward
from gflowdiff.training.data import PromptDataModule
from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.optimization import OptimizationConfig
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = REPO / "configs" / "digits" / "residual_nabla_db_paper.yaml"


def tiny_fit_args(tiny_sd_path, root: Path, max_steps: int = 2) -> list[str]:
    return [
        "fit", "--config", str(DIGITS_CONFIG),
        "--model.pretrained_model", str(tiny_sd_path),
        "--model.sampler.num_inference_steps", "4",
        "--model.objective.timestep_fraction", "0.5",
        "--model.optimization.train_batch_size", "4",
        "--data.batch_size", "2",
        "--data.eval_batch_size", "2",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.callbacks.init_args.dirpath", str(root / "ckpt"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_flow_head_is_zero_at_init():
    head = FlowHead(FlowHeadConfig(block_out_channels=[8, 16], norm_num_groups=4), 4, 8, 16)
    out = head(torch.randn(3, 4, 8, 8), torch.tensor([981, 21, -19]), torch.randn(3, 5, 16))
    assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0


def test_step_zero_reproduces_the_pretrained_sampler(tiny_sd_path):
    module = GFlowDiffModule(
        objective=ResidualNablaDB(), reward=DigitClassifierReward(), pretrained_model=str(tiny_sd_path)
    )
    sampler = SamplerConfig(num_inference_steps=5, guidance_scale=3.0)
    prompts = ["a cat", "a dog", "a cow"]
    tuned = sample_rollout(module.policy, prompts, module.reward, sampler, torch.Generator().manual_seed(7))
    with module.policy.reference():
        pretrained = sample_rollout(module.policy, prompts, module.reward, sampler, torch.Generator().manual_seed(7))
    torch.testing.assert_close(tuned.latents, pretrained.latents, rtol=0, atol=0)
    torch.testing.assert_close(tuned.rewards, pretrained.rewards, rtol=0, atol=0)


def test_fit_checkpoints_only_trainable_state_and_resumes(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(tiny_fit_args(tiny_sd_path, tmp_path, max_steps=2))
    assert cli.trainer.global_step == 2
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert any(".lora_A." in k for k in keys) and any(k.startswith("flow_head.") for k in keys)
    assert not any(k.startswith(("reward.", "policy.vae.", "policy.text_encoder.")) for k in keys)
    assert not any(k.startswith("policy.unet.") and "lora_" not in k for k in keys)  # no frozen UNet weight
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"]
    assert checkpoint["gflowdiff"]["rollouts_done"] == 2

    resumed = main([*tiny_fit_args(tiny_sd_path, tmp_path, max_steps=4), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert resumed.model.rollouts_done == 4  # continued at the saved step, not from 0

    # `gflowdiff validate` evaluates the checkpoint: reward, diversity, prior and target fidelity, all finite
    validate_args = [a if a != "fit" else "validate" for a in tiny_fit_args(tiny_sd_path, tmp_path)]
    validated = main([*validate_args, "--ckpt_path", str(last), "--data.eval_batch_size", "6"])
    metrics = validated.trainer.callback_metrics
    for key in (
        "reward_mean",
        "diversity",
        "pretrained_diversity",
        "prior_fid",
        "prior_kid",
        "prior_fid_floor",
        "prior_kid_floor",
        "target_tv",
    ):
        assert torch.isfinite(metrics[f"val/{key}"]), key
    assert float(metrics["val/prior_fid"]) > 0  # the trained LoRA moved the samples away from the prior


def test_print_config_output_runs_as_a_config(tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny_fit_args(tiny_sd_path, tmp_path, max_steps=1), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cli = main(["fit", "--config", str(printed)])
    assert cli.trainer.global_step == 1


CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))
# Partial configs compose after an objective config: trainer overrides (configs/sd15/trainer/) and objective overrides
# (configs/digits/overrides/, configs/overrides/).
PARTIAL_BASES = {"trainer": "sd15/residual_nabla_db.yaml", "overrides": "digits/residual_nabla_db.yaml"}


class BuildOnly(GFlowDiffCLI):
    """``gflowdiff fit``'s parsing and model/data instantiation, without a trainer (the SD configs ask for GPUs)."""

    def instantiate_trainer(self, **kwargs):
        return None


def config_files(config: Path) -> list[Path]:
    base = PARTIAL_BASES.get(config.parent.name)
    return [REPO / "configs" / base, REPO / config] if base else [REPO / config]


def merged(base: dict, override: dict) -> dict:
    """``override`` on ``base``, key by key at every level (as repeated --config files compose)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def composed_model_section(files: list[Path]) -> dict:
    """``model:`` of the composed YAML files."""
    model: dict = {}
    for path in files:
        model = merged(model, (yaml.safe_load(path.read_text()) or {}).get("model") or {})
    return model


@pytest.fixture(scope="module")
def reward_stand_ins(tmp_path_factory) -> dict[str, list[str] | None]:
    """Overrides that build each SD-scale reward on a tiny random model through its real constructor (test_rewards);
    None for the aesthetic reward when the LAION head file (shared data) is absent."""
    from transformers import AutoTokenizer

    from tests.rewards import test_rewards as rewards

    root = tmp_path_factory.mktemp("reward_stand_ins")
    clip = rewards.build_tiny_clip(root / "clip_768", projection_dim=768)
    bert = rewards.build_tiny_bert_tokenizer(root / "bert")
    image_reward = root / "ImageReward.pt"
    rewards.build_tiny_image_reward_checkpoint(image_reward, len(AutoTokenizer.from_pretrained(bert)))
    hpsv2 = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": rewards.FakeOpenClipModel().state_dict()}, hpsv2)
    heads, head = str(rewards.IR_HEADS), SHARED_DATA / rewards.AESTHETIC_HEAD
    return {
        "AestheticReward": ["--model.reward.clip_model", str(clip), "--model.reward.head_path", str(head)]
        if head.is_file() else None,
        "ImageReward": ["--model.reward.checkpoint", str(image_reward), "--model.reward.tokenizer", str(bert),
                        "--model.reward.vision_heads", heads, "--model.reward.text_heads", heads],
        "HPSv2Reward": ["--model.reward.checkpoint", str(hpsv2)],
    }  # fmt: skip


def user_prompt_file(config_data: dict, root: Path) -> None:
    """The SD configs' user-supplied prompt files (``prompts/drawbench.csv``: relative to the working directory) as
    two-prompt stand-ins under ``root``, in the same format."""
    source = str((config_data or {}).get("train_prompts", ""))
    if source.endswith((".txt", ".csv")) and not Path(source).is_absolute():
        path = root / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("Prompts\na red apple\na blue car\n" if source.endswith(".csv") else "a cat\na dog\n")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_builds_its_model_and_data(config, tiny_sd_path, reward_stand_ins, monkeypatch, tmp_path, request):
    """Each config's classes are instantiated, not only parsed; a model that is not here (SD-1.5 from the hub) is
    replaced by the tiny random SD folder, an SD-scale reward by the same reward class on a tiny random model."""
    from tests.rewards.test_rewards import fake_open_clip_module

    files = config_files(config)
    model_section = composed_model_section(files)
    reward = model_section["reward"]["class_path"]
    args = [arg for path in files for arg in ("--config", str(path))]
    if not str(model_section.get("pretrained_model", "embedded:digits")).startswith("embedded:"):
        family = config.parts[1]  # configs/<family>/...: the tiny random pipeline of the config's model family
        tiny = {"sdxl": "tiny_sdxl_path", "sd35": "tiny_sd3_path"}.get(family)
        args += ["--model.pretrained_model", str(request.getfixturevalue(tiny) if tiny else tiny_sd_path)]
    stand_in = reward_stand_ins.get(reward, [])
    if stand_in is None:
        pytest.skip(f"{reward}'s stand-in needs {SHARED_DATA}")
    args += stand_in
    monkeypatch.setitem(sys.modules, "open_clip", fake_open_clip_module())  # HPSv2's open_clip, faked
    monkeypatch.setattr(sys, "argv", ["gflowdiff"])
    monkeypatch.chdir(tmp_path)
    for path in files:
        user_prompt_file((yaml.safe_load(path.read_text()) or {}).get("data"), tmp_path)

    cli = BuildOnly(GFlowDiffModule, PromptDataModule, **cli_options(), args=args, run=False)
    assert isinstance(cli.model, GFlowDiffModule) and isinstance(cli.datamodule, PromptDataModule)
    assert type(cli.model.objective).__name__ == model_section["objective"]["class_path"].rsplit(".", 1)[-1]
    assert type(cli.model.reward).__name__ == reward.rsplit(".", 1)[-1]
    assert cli.datamodule.train_prompt_list and next(iter(cli.datamodule.train_dataloader()))
    if config.name == "beta2.yaml":
        assert cli.model.objective.reward_scale == 2.0
    if config.name == "adjacent_pairs.yaml":
        assert cli.model.objective.adjacent_pairs is True
    if config.name == "compile.yaml":
        assert cli.model.performance.compile is True


def test_bad_input_errors_name_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DIGITS_CONFIG), "--model.objective", "NoSuchObjective", "--print_config"])
    assert "NoSuchObjective" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DIGITS_CONFIG), "--model.no_such_key", "1", "--print_config"])
    assert "no_such_key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model.objective.reverse_loss_scale"):
        ResidualNablaDB(reverse_loss_scale=-1)


def test_float32_matmul_precision_option(tmp_path, monkeypatch, capsys):
    """``--float32_matmul_precision high`` turns on TF32 matmuls (as the reference code runs) before anything is built;
    a bad value names the option."""
    monkeypatch.chdir(tmp_path)
    before = torch.get_float32_matmul_precision()
    try:
        args = ["--config", str(DIGITS_CONFIG), "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
        main(["validate", *args, "--trainer.default_root_dir", str(tmp_path), "--float32_matmul_precision", "high"])
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DIGITS_CONFIG), "--float32_matmul_precision", "tf32", "--print_config"])
    assert "float32_matmul_precision" in capsys.readouterr().err


class NaNReward(DigitClassifierReward):
    """Returns NaN for every image: each step must be skipped, and the run stopped after too many."""

    def score(self, images, prompts):
        return super().score(images, prompts) * float("nan")


def nan_reward_fit(tiny_sd_path, tmp_path, check_reward_gradient: bool):
    import lightning as L

    from gflowdiff.training.data import PromptDataModule

    module = GFlowDiffModule(
        objective=ResidualNablaDB(timestep_fraction=0.5),
        reward=NaNReward(),
        pretrained_model=str(tiny_sd_path),
        sampler=SamplerConfig(num_inference_steps=2, guidance_scale=1.0),
        optimization=OptimizationConfig(max_consecutive_bad_steps=2),
        check_reward_gradient=check_reward_gradient,
    )
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    return module, trainer, lambda: trainer.fit(module, PromptDataModule(train_prompts="animals", batch_size=2))


def test_nan_reward_is_caught_by_the_start_up_self_check(tiny_sd_path, tmp_path):
    from gflowdiff.rewards import RewardGradientError

    module, trainer, fit = nan_reward_fit(tiny_sd_path, tmp_path, check_reward_gradient=True)
    with pytest.raises(RewardGradientError, match="NaNReward returned non-finite rewards"):
        fit()
    assert module.rollouts_done == 0  # before any rollout


def test_nan_rewards_skip_steps_then_stop_with_a_clear_error(tiny_sd_path, tmp_path):
    module, trainer, fit = nan_reward_fit(tiny_sd_path, tmp_path, check_reward_gradient=False)
    lora_before = [p.detach().clone() for p in module.policy.lora_parameters()]
    with pytest.raises(FloatingPointError, match="2 consecutive steps.*--model.reward NaNReward returned NaN"):
        fit()
    assert module.skipped_steps == 2 and trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(lora_before, module.policy.lora_parameters(), strict=True))


def test_chunks_are_split_into_contiguous_optimizer_steps():
    from gflowdiff.training.module import split_into_steps

    # 7 chunks over 3 steps: sizes 3, 2, 2 in order; more steps than chunks drops the empty ones.
    assert split_into_steps(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert split_into_steps(list("ab"), 4) == [["a"], ["b"]]
    assert split_into_steps(list("abc"), 1) == [["a", "b", "c"]]
