"""``--model.optimization.train_batch_size`` is a memory knob: it must not change what a step optimises (issue: the
terminal term's weight used to be the fraction of chunks holding a terminal row, 1.0 at one chunk, 0.33 at one row per
chunk)."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.cli import main
from gflowdiff.objectives.flow_head import FlowHead
from tests.training.test_module import tiny_fit_args


def step_gradients(tiny_sd_path, root, train_batch_size: int, extra: list[str]) -> dict[str, torch.Tensor]:
    """The gradients of the first optimizer step (left on the parameters after it: manual optimization zeroes them
    only at the start of the next step), with a learning rate of 0 so the step changes nothing."""
    cli = main([
        *tiny_fit_args(tiny_sd_path, root, max_steps=1),
        "--data.batch_size", "4",  # 4 trajectories × 3 transitions (2 + the terminal one) = 12 per step
        "--model.optimization.train_batch_size", str(train_batch_size),
        "--model.optimizer.init_args.lr", "0.0",
        "--trainer.val_check_interval", "10",
        *extra,
    ])  # fmt: skip
    grads = {name: p.grad.clone() for name, p in cli.model.named_parameters() if p.grad is not None}
    assert any("lora_" in name for name in grads)
    return grads


OBJECTIVES = {
    "residual_nabla_db": [],  # the paper's parameterisation: forward, reverse and terminal terms, a flow head
    "db": ["--model.objective", "DB", "--model.objective.timestep_fraction", "0.5"],
}


def nonzero_flow_head(monkeypatch) -> None:
    """g_φ is zero-initialised, so ‖g_φ(x_T)‖² has no gradient at step 0: give its output layer fixed random weights."""
    original = FlowHead.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        generator = torch.Generator().manual_seed(0)
        for parameter in self.unet.conv_out.parameters():
            parameter.data = 0.1 * torch.randn(parameter.shape, generator=generator)

    monkeypatch.setattr(FlowHead, "__init__", init)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_step_gradient_is_independent_of_train_batch_size(objective, tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nonzero_flow_head(monkeypatch)
    reference = None
    for size in (1, 4, 5, 16):  # 12 chunks of 1, 3 of 4, 5 + 5 + 2, one of 12
        grads = step_gradients(tiny_sd_path, tmp_path / f"b{size}", size, OBJECTIVES[objective])
        if reference is None:
            reference = grads
            continue
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            # float32 sums in another order: measured relative differences ≤ 1e-5; the terminal term's old
            # chunk-dependent weight moved the flow head's gradient by tens of percent
            error = (grad - reference[name]).norm() / reference[name].norm().clamp(min=1e-12)
            assert error < 1e-4, f"{name}: relative difference {float(error):.2e} at train_batch_size {size}"
