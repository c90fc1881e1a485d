"""The CLI's own options (issue 18): only ``--model.optimizer`` sets the optimizer, and bad input gets a message
naming the option before the model loads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gflowdiff.cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = REPO / "configs" / "digits" / "residual_nabla_db_paper.yaml"


def parse_error(capsys, *args: str) -> str:
    """The parser's message for ``fit --config digits <args> --print_config`` (which must fail)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DIGITS_CONFIG), *args, "--print_config"])
    assert exit_info.value.code not in (0, None), "the parser accepted it"
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--optimizer", "torch.optim.Adam"), ("--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR")],
)
def test_lightning_automatic_optimizer_options_do_not_exist(capsys, option, value):
    """LightningCLI's top-level --optimizer would replace the module's two parameter groups by one."""
    error = parse_error(capsys, option, value)
    assert option.lstrip("-") in error


@pytest.mark.parametrize(
    ("option", "known"), [("--model.objective", "ResidualNablaDB"), ("--model.reward", "DigitClassifierReward")]
)
def test_unknown_objective_or_reward_lists_the_valid_names(capsys, option, known):
    error = parse_error(capsys, option, "FooDB")
    assert f"{option}: unknown {option.rsplit('.', 1)[-1]} 'FooDB'" in error and known in error
    assert len(error.splitlines()) < 5  # the message, not a 94-line usage block


@pytest.mark.parametrize("content", [random.Random(0).randbytes(3000), "cut"])
def test_unreadable_ckpt_path_gets_gflowdiffs_message(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "cut":  # a real checkpoint cut short
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(RuntimeError) as error:
        main(["validate", "--config", str(DIGITS_CONFIG), "--ckpt_path", str(path), "--trainer.logger", "false"])
    assert str(path) in str(error.value)
    chain = [error.value, error.value.__cause__, error.value.__context__]
    assert not any("weights_only" in str(e) for e in chain if e is not None and not error.value.__suppress_context__)
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model.optimizer.init_args.lr", "-0.001"], "--model.optimizer.init_args.lr must be >= 0"),
        (["--model.optimization.flow_head_lr", "-1"], "--model.optimization.flow_head_lr must be >= 0"),
        (["--model.lora.rank", "0"], "--model.lora.rank must be >= 1"),
        (["--model.lora.alpha", "0"], "--model.lora.alpha must be > 0"),
        (["--model.sampler.guidance_scale", "-2"], "--model.sampler.guidance_scale must be >= 0"),
    ],
)
def test_bad_values_name_the_option_before_the_model_loads(monkeypatch, args, named):
    from gflowdiff.diffusion import policy

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(policy.DiffusionPolicy, "__init__", no_loading)
    with pytest.raises(ValueError, match=named.replace(".", "\\.")):
        main(["fit", "--config", str(DIGITS_CONFIG), *args, "--trainer.logger", "false"])


def test_unknown_lora_target_module_names_the_option(tiny_sd_path):
    from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig

    with pytest.raises(ValueError, match="--model.lora.target_modules: 'to_qq' matches no layer of the UNet.*to_q"):
        DiffusionPolicy(str(tiny_sd_path), lora=LoRAConfig(target_modules=["to_q", "to_qq"]))


def test_flat_module_options_of_older_versions_name_their_new_place(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  train_batch_size: 2\n  channels_last: true\n  log_images_every_n_steps: 0\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DIGITS_CONFIG), "--config", str(old), "--model.compile_backend=eager"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--config {old}: model.train_batch_size is now model.optimization.train_batch_size" in error
    assert "model.channels_last is now model.performance.channels_last" in error
    assert "model.log_images_every_n_steps is now model.evaluation.log_images_every_n_steps" in error
    assert "command line: --model.compile_backend is now --model.performance.compile_backend" in error
    assert str(DIGITS_CONFIG) not in error  # the repository's configs use the groups


def test_invalid_yaml_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lora:\n    rank: 4\n   alpha: [1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(broken)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--config {broken}: line 4" in error and "invalid YAML" in error


def test_a_non_square_unet_is_refused_naming_the_model(tiny_sd_path, tmp_path):
    import json
    import shutil

    from gflowdiff.diffusion.policy import DiffusionPolicy

    folder = tmp_path / "non_square"
    shutil.copytree(tiny_sd_path, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] = [config["sample_size"], 2 * config["sample_size"]]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--model.pretrained_model .*non-square sample_size"):
        DiffusionPolicy(str(folder))


@pytest.mark.parametrize("name", ["ResidualNablaDB", "NablaDB"])
def test_objective_help_lists_every_inherited_option(name, capsys):
    # ResidualNablaDB passes its parent's options through **kwargs instead of restating them: --help must still
    # list each of them (jsonargparse follows the **kwargs into GradientDBObjective.__init__).
    import inspect

    from gflowdiff.objectives.gradient_db.objective import GradientDBObjective

    with pytest.raises(SystemExit):
        main(["fit", "--model.objective.help", name])
    shown = capsys.readouterr().out
    for option in inspect.signature(GradientDBObjective.__init__).parameters:
        if option != "self":
            assert f"--model.objective.{option} " in shown, option
