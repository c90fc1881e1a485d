"""``gflowdiff``: the LightningCLI entry point (fit, validate, test, predict).

Objectives and rewards are chosen by type: ``--model.objective ResidualNablaDB`` or, in YAML,
``model.objective: {class_path: ResidualNablaDB, init_args: {...}}``. Every public class in
:mod:`gflowdiff.objectives` and :mod:`gflowdiff.rewards` resolves by its short name.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

import gflowdiff.objectives  # noqa: F401  (registers the objective plugins for class_path resolution)
import gflowdiff.rewards  # noqa: F401  (registers the reward plugins)
from gflowdiff.data import PromptDataModule
from gflowdiff.module import GFlowDiffModule


class GFlowDiffCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")


def main(args: list[str] | None = None) -> GFlowDiffCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return GFlowDiffCLI(
        GFlowDiffModule,
        PromptDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
