"""The CLI's own options (issue 18): only ``--model.optimizer`` sets the optimizer, and bad input gets a message
naming the option before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gflowdiff.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits" / "residual_nabla_db.yaml"


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
