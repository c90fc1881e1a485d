"""Checkpoints of older gflowdiff versions hold options that no longer exist: they still load where the option's
value behaved as today's code does, and are refused, naming the option, where it did not."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.cli import main
from gflowdiff.training.loading import load_trained_module
from gflowdiff.training.retired_options import MOVED_MODULE_OPTIONS, migrate_module_options, migrate_objective
from tests.training.test_module import tiny_fit_args


def test_migrate_objective_drops_harmless_values_and_maps_renamed_ones():
    init_args = {"reverse_loss_trains_policy": False, "pass_structure": "reference", "reward_scale": 2.0}
    old = {"class_path": "gflowdiff.objectives.ResidualNablaDB", "init_args": init_args}
    new = migrate_objective(old, "checkpoint x")
    assert new["init_args"] == {"pass_structure": "fused", "reward_scale": 2.0}
    assert old["init_args"]["pass_structure"] == "reference"  # the input is not modified
    with pytest.raises(ValueError, match="--model.objective.reverse_loss_trains_policy True"):
        migrate_objective({"class_path": "X", "init_args": {"reverse_loss_trains_policy": True}}, "checkpoint x")


def test_an_older_checkpoint_with_a_retired_option_loads(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(tiny_fit_args(tiny_sd_path, tmp_path, max_steps=1))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["objective"]["init_args"]["reverse_loss_trains_policy"] = False  # as before
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = load_trained_module(old)
    assert type(module.objective).__name__ == "ResidualNablaDB"
    checkpoint["hyper_parameters"]["objective"]["init_args"]["reverse_loss_trains_policy"] = True
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match="reverse_loss_trains_policy"):
        load_trained_module(old)


def test_migrate_module_options_moves_flat_options_into_their_groups():
    old = {"seed": 3, "train_batch_size": 8, "lr_decay": "cosine", "compile": False, "log_images_every_n_steps": 0,
           "optimization": {"max_grad_norm": 0.5}}  # fmt: skip
    new = migrate_module_options(old)
    assert new == {
        "seed": 3,
        "optimization": {"max_grad_norm": 0.5, "train_batch_size": 8, "lr_decay": "cosine"},
        "performance": {"compile": False},
        "evaluation": {"log_images_every_n_steps": 0},
    }
    assert "train_batch_size" in old and old["optimization"] == {"max_grad_norm": 0.5}  # the input is not modified


def test_a_checkpoint_with_the_flat_module_options_of_older_versions_loads(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([*tiny_fit_args(tiny_sd_path, tmp_path, max_steps=1), "--model.optimization.train_batch_size", "3"])
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    for group in ("optimization", "performance", "evaluation"):  # flatten them, as gflowdiff saved them before
        hparams.update(hparams.pop(group))
    assert set(MOVED_MODULE_OPTIONS) <= set(hparams)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = load_trained_module(old)
    assert module.optimization.train_batch_size == 3 and module.performance.channels_last is True
    assert module.evaluation.log_images_every_n_steps == 20  # the digits config's value, now in its group
    torch.testing.assert_close(module.state_dict(), load_trained_module(path).state_dict(), rtol=0, atol=0)
