"""The scheduler of a model folder (issue 18 item 10): gflowdiff says which class it found and that it samples with its
own DDIM math from the same betas, and refuses noise schedules that math does not handle."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gflowdiff.diffusion.policy import DiffusionPolicy


def with_scheduler(tiny_sd_path: Path, root: Path, scheduler) -> Path:
    """The tiny SD folder with another ``scheduler/`` (the other parts linked, not copied)."""
    model = root / "model"
    model.mkdir()
    for part in tiny_sd_path.iterdir():
        if part.name != "scheduler":
            (model / part.name).symlink_to(part)
    scheduler.save_config(model / "scheduler")
    return model


def sd15_pndm():
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def test_the_loaded_scheduler_class_is_named_once_at_start_up(tiny_sd_path, tmp_path, caplog):
    model = with_scheduler(tiny_sd_path, tmp_path, sd15_pndm())
    with caplog.at_level(logging.INFO):
        policy = DiffusionPolicy(str(model))
        DiffusionPolicy(str(model))
    lines = [r.getMessage() for r in caplog.records if "PNDMScheduler" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "samples with its own DDIM η math" in lines[0] and "scaled_linear" in lines[0]
    assert type(policy.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize(
    ("change", "named"),
    [({"timestep_spacing": "linspace"}, "timestep_spacing 'linspace'"),
     ({"timestep_spacing": "trailing"}, "timestep_spacing 'trailing'"),
     ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'")],
)  # fmt: skip
def test_schedules_the_math_does_not_handle_are_refused(tiny_sd_path, tmp_path, change, named):
    from diffusers import DDPMScheduler

    settings = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", **change}
    model = with_scheduler(tiny_sd_path, tmp_path, DDPMScheduler(**settings))
    with pytest.raises(ValueError, match=f"--model.pretrained_model .*{named}"):
        DiffusionPolicy(str(model))
