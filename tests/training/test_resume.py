"""Exact resume on CPU: a run killed right after its step-2 checkpoint and resumed to step 4 ends with the
uninterrupted run's weights and logged reward curve."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gflowdiff.cli import main
from tests.training.test_module import tiny_fit_args
from tests.training.test_preemption import reward_curve


class KilledAfterCheckpoint(Exception):
    """Stands in for a SIGKILL that lands right after a checkpoint file is written."""


@contextmanager
def killed_after_checkpoint(monkeypatch, step: int) -> Iterator[None]:
    """A fit inside the block dies (KilledAfterCheckpoint, expected) right after writing its step-``step``
    checkpoint; checkpoint saving is restored afterwards."""
    save = ModelCheckpoint._save_checkpoint

    def save_then_die(callback, trainer, filepath):
        save(callback, trainer, filepath)
        if trainer.global_step == step:
            raise KilledAfterCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", save_then_die)
    try:
        with pytest.raises(KilledAfterCheckpoint):
            yield
    finally:
        monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", save)


def trainable(cli) -> dict[str, torch.Tensor]:
    module = cli.model
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in module.trainable_names}


def fit_args(tiny_sd_path, root, *extra: str) -> list[str]:
    """Four steps, logged into one TensorBoard folder however often the run is resumed."""
    return [*tiny_fit_args(tiny_sd_path, root, max_steps=4), "--trainer.logger.init_args.version", "0", *extra]


def test_resumed_run_reproduces_the_uninterrupted_run(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uninterrupted = main(fit_args(tiny_sd_path, tmp_path / "a"))

    # Kill run b right after its step-2 checkpoint is written: Lightning logs a step's metrics after the checkpoints
    # of that step, so the step's reward point is not on disk yet (checked below).
    with killed_after_checkpoint(monkeypatch, step=2):
        main(fit_args(tiny_sd_path, tmp_path / "b"))
    assert sorted(reward_curve(tmp_path / "b" / "runs")) == [0]
    resumed = main(fit_args(tiny_sd_path, tmp_path / "b", "--ckpt_path", "last"))

    assert resumed.trainer.global_step == uninterrupted.trainer.global_step == 4
    expected, actual = trainable(uninterrupted), trainable(resumed)
    assert expected.keys() == actual.keys()
    changed = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    # The data position was restored too: both runs trained on the same 4 prompt batches.
    assert resumed.datamodule.train_dataloader().position == uninterrupted.datamodule.train_dataloader().position == 4
    # The checkpoint carried the killed step's metrics, and the resumed run logged them: no point is lost.
    expected_curve = reward_curve(tmp_path / "a" / "runs")
    assert sorted(expected_curve) == [0, 1, 2, 3]
    assert reward_curve(tmp_path / "b" / "runs") == expected_curve


def test_last_resolves_to_the_highest_readable_step(tmp_path):
    """`--ckpt_path last` takes the newest step among all checkpoints (a kill can land between step=N.ckpt and
    last.ckpt), prefers last.ckpt at equal steps, and skips a corrupt file."""
    from gflowdiff.training.checkpointing import newest_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in [("epoch=0-step=2.ckpt", 2), ("last.ckpt", 2), ("epoch=0-step=4.ckpt", 4)]:
        torch.save({"global_step": step}, folder / name)
    assert newest_checkpoint([folder, tmp_path / "absent"]).name == "epoch=0-step=4.ckpt"

    (folder / "epoch=0-step=4.ckpt").write_bytes(b"cut off")
    with pytest.warns(UserWarning, match="skipping .*step=4.ckpt"):
        assert newest_checkpoint([folder]).name == "last.ckpt"
    assert newest_checkpoint([tmp_path / "absent"]) is None
