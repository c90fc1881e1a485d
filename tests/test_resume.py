"""Exact resume on CPU: a run stopped at step 2 and resumed to step 4 ends with the uninterrupted run's weights."""

from __future__ import annotations

import torch

from gflowdiff.cli import main
from tests.test_module import tiny_fit_args


def trainable(cli) -> dict[str, torch.Tensor]:
    module = cli.model
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in module.trainable_names}


def test_resumed_run_reproduces_the_uninterrupted_run(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uninterrupted = main(tiny_fit_args(tiny_sd_path, tmp_path / "a", max_steps=4))
    main(tiny_fit_args(tiny_sd_path, tmp_path / "b", max_steps=2))
    resumed = main([*tiny_fit_args(tiny_sd_path, tmp_path / "b", max_steps=4), "--ckpt_path", "last"])

    assert resumed.trainer.global_step == uninterrupted.trainer.global_step == 4
    expected, actual = trainable(uninterrupted), trainable(resumed)
    assert expected.keys() == actual.keys()
    changed = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    # The data position was restored too: both runs trained on the same 4 prompt batches.
    assert resumed.datamodule.train_dataloader().position == uninterrupted.datamodule.train_dataloader().position == 4


def test_last_resolves_to_the_highest_readable_step(tmp_path):
    """`--ckpt_path last` takes the newest step among all checkpoints (a kill can land between step=N.ckpt and
    last.ckpt), prefers last.ckpt at equal steps, and skips a corrupt file."""
    import pytest

    from gflowdiff.checkpointing import newest_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in [("epoch=0-step=2.ckpt", 2), ("last.ckpt", 2), ("epoch=0-step=4.ckpt", 4)]:
        torch.save({"global_step": step}, folder / name)
    assert newest_checkpoint([folder, tmp_path / "absent"]).name == "epoch=0-step=4.ckpt"

    (folder / "epoch=0-step=4.ckpt").write_bytes(b"cut off")
    with pytest.warns(UserWarning, match="skipping .*step=4.ckpt"):
        assert newest_checkpoint([folder]).name == "last.ckpt"
    assert newest_checkpoint([tmp_path / "absent"]) is None
