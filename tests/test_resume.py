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
