"""``gflowdiff``: the LightningCLI entry point (fit, validate, test), ``gflowdiff compare``, ``gflowdiff sample`` and
the overview (``gflowdiff --help``, ``gflowdiff objectives``, ``gflowdiff rewards``).

Objectives and rewards are chosen by type: ``--model.objective ResidualNablaDB`` or, in YAML,
``model.objective: {class_path: ResidualNablaDB, init_args: {...}}``. Every public class in
:mod:`gflowdiff.objectives` and :mod:`gflowdiff.rewards` resolves by its short name.

``validate``/``test`` score the checkpoint given by ``--ckpt_path``; without one they score the pretrained model
(a baseline, which is useful) and say so in a warning at start-up.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn

import gflowdiff.objectives  # noqa: F401  (registers the objective plugins for class_path resolution)
import gflowdiff.rewards  # noqa: F401  (registers the reward plugins)
from gflowdiff.overview import plugin_choices
from gflowdiff.training.checkpointing import SafeCheckpointIO, check_resumable
from gflowdiff.training.data import PromptDataModule
from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.preemption import PreemptionCheckpoint
from gflowdiff.training.quiet import StepProgressBar, silence_known_messages
from gflowdiff.training.resume import check_checkpoint_settings, resolve_last_checkpoint
from gflowdiff.training.retired_options import moved_option_messages
from gflowdiff.training.run_lock import run_folder_lock

EVALUATING = ("validate", "test")
PRETRAINED_NOTICE = (
    "gflowdiff {subcommand}: no --ckpt_path given: scoring the PRETRAINED model (its LoRA update is zero at start). "
    "Pass --ckpt_path <run>/checkpoints/last.ckpt (or --ckpt_path last) to score a fine-tuned run."
)
LIGHTNING_CKPT_ALIASES = ("best", "hpc", "registry")  # Lightning resolves these ("last" is ours: training/resume.py)


class SaveConfigWhenStarted(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` writer, deferred from ``setup`` to the start of the loop that runs (training,
    validation, test, predict): a resume that fails while restoring the checkpoint leaves the run's config intact."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Nothing yet: the checkpoint is restored after ``setup``."""

    def save_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, trainer.state.stage or "fit")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_now(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_now(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_now(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_now(trainer, pl_module)


def unknown_plugin_message(message: str) -> str | None:
    """For the parser's "Expected a dot import path" error on ``model.objective``/``model.reward``: a one-line
    message with the valid names; None for any other error."""
    key = re.match(r'Parser key "model\.(objective|reward)"', message)
    if key is None or "import path" not in message:
        return None
    value = re.search(r"dot import path string: (\S+)", message)
    given = f" {value.group(1)!r}" if value else ""
    return (
        f"--model.{key.group(1)}: unknown {key.group(1)}{given}; known: {', '.join(plugin_choices(key.group(1)))} "
        f"(or the full class path of your own subclass, e.g. my_package.My{key.group(1).title()})"
    )


class GFlowDiffParser(LightningArgumentParser):
    """LightningCLI's parser; an unknown objective or reward name gets a one-line error listing the valid ones
    instead of the usage block and jsonargparse's "Expected a path" message."""

    def error(self, message: str, ex: Exception | None = None):
        friendly = unknown_plugin_message(message)
        if friendly is None or not self.exit_on_error:
            return super().error(friendly or message, ex)
        sys.stderr.write(f"error: {friendly}\ntip: gflowdiff fit --help lists every option\n")
        self.exit(2)


def check_option_values(model: Any) -> None:
    """Values the classes would accept silently or reject only once the model is loaded."""
    optimizer_args = (model.get("optimizer") or {}).get("init_args") or {}
    for option, value in [
        ("optimizer.init_args.lr", optimizer_args.get("lr")),
    ]:
        if value is not None and value < 0:
            raise ValueError(f"--model.{option} must be >= 0 (got {value})")
    guidance = (model.get("sampler") or {}).get("guidance_scale")
    if guidance is not None and guidance < 0:
        raise ValueError(f"--model.sampler.guidance_scale must be >= 0 (got {guidance}; 1 disables guidance)")


class GFlowDiffCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; no predict (the module has no predict_step: ``gflowdiff sample`` writes samples)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict")
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"],
            default="highest",
            help="torch.set_float32_matmul_precision for the fp32 networks (LoRA, flow head, rewards) on GPUs: "
            "'high' allows TF32 tensor cores, as the reference code does; 'highest' keeps full fp32.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_option_values(config.model)
        torch.set_float32_matmul_precision(config.float32_matmul_precision)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Defaults every run gets unless the config says otherwise: atomic, weights-only checkpoint IO; a
        step-boundary preemption checkpoint; a progress bar counting optimizer steps (training/quiet.py); and, on SLURM,
        Lightning's environment without its own mid-step auto-requeue handler (training/preemption.py explains why)."""
        plugins = list(config.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))
        config["plugins"] = plugins
        configured = config.get("callbacks") or []
        configured = (configured if isinstance(configured, list) else [configured]) + list(callbacks)
        if not any(isinstance(c, PreemptionCheckpoint) for c in configured):
            callbacks = [*callbacks, PreemptionCheckpoint()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest readable checkpoint of the run, before anything is built
        (:func:`gflowdiff.training.resume.resolve_last_checkpoint`; None, i.e. start fresh, when there is none yet),
        and check a checkpoint's settings against the user's.

        Replaces Lightning's version, which parses the checkpoint's hyperparameters over the user's ``--config`` and
        command line: here what the user passes wins, and settings that cannot change on resume raise an error
        (:func:`gflowdiff.training.resume.check_checkpoint_settings`)."""
        self.resume_checkpoint = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            newest = resolve_last_checkpoint(config, subcommand)
            config.ckpt_path = None if newest is None else str(newest)
        path = config.get("ckpt_path")
        if path and path not in LIGHTNING_CKPT_ALIASES and "://" not in str(path):
            checkpoint = SafeCheckpointIO().load_checkpoint(path)
            check_checkpoint_settings(config.model, checkpoint, Path(path))
            self.resume_checkpoint = checkpoint  # checked against the built model in _prepare_subcommand_kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        """Before the trainer writes anything: the checkpoint fits the built model and its optimizer, and this
        process takes the run folder's lock (training/run_lock.py), held until the subcommand ends."""
        if self.resume_checkpoint is not None:
            check_resumable(self.model, self.resume_checkpoint, with_optimizer=subcommand == "fit")
            self.resume_checkpoint = None
        if subcommand in EVALUATING and not self.config[subcommand].get("ckpt_path"):
            rank_zero_warn(PRETRAINED_NOTICE.format(subcommand=subcommand))
        with run_folder_lock(self.trainer):
            super()._run_subcommand(subcommand)


def cli_options() -> dict[str, Any]:
    """GFlowDiffCLI's settings, shared by :func:`main` and tests that build a config's classes without running."""
    return {
        "seed_everything_default": 0,
        # No top-level --optimizer/--lr_scheduler: they would replace configure_optimizers, i.e. the LoRA and flow
        # head parameter groups, by one group. The optimizer is --model.optimizer.
        "auto_configure_optimizers": False,
        "save_config_callback": SaveConfigWhenStarted,
        "parser_class": GFlowDiffParser,
        "save_config_kwargs": {"overwrite": True},
    }


def config_files(args: list[str]) -> list[str]:
    """The files given with ``--config FILE`` or ``--config=FILE``."""
    files = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--config"]
    return files + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def check_config_syntax(args: list[str]) -> None:
    """Refuse a ``--config`` file that is not valid YAML with its path and line (the parser names neither the file nor,
    for some errors, the line of the file)."""
    for name in config_files(args):
        path = Path(name)
        if not path.is_file():
            continue  # the parser reports it
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            sys.stderr.write(f"error: --config {name}:{where}: invalid YAML: {problem}\n")
            sys.exit(2)


def check_moved_options(args: list[str]) -> None:
    """Refuse the flat module options of older versions (``--model.train_batch_size``, ``model: {compile: ...}``),
    naming where each one lives now, instead of the parser's "unrecognized arguments"."""
    messages = []
    for name in config_files(args):
        path = Path(name)
        if path.is_file():
            messages += moved_option_messages((yaml.safe_load(path.read_text()) or {}).get("model"), f"--config {name}")
    flags = {arg.split("=", 1)[0].removeprefix("--model.") for arg in args if arg.startswith("--model.")}
    messages += moved_option_messages(dict.fromkeys(flags), "command line", prefix="--model.")
    if messages:
        sys.stderr.write("".join(f"error: {line}\n" for line in messages))
        sys.exit(2)


def main(args: list[str] | None = None) -> GFlowDiffCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_messages()
    check_config_syntax(sys.argv[1:] if args is None else args)
    check_moved_options(sys.argv[1:] if args is None else args)
    return GFlowDiffCLI(GFlowDiffModule, PromptDataModule, **cli_options(), args=args)


PREDICT_REPLACED = (
    'error: gflowdiff has no predict; use gflowdiff sample --ckpt_path CKPT --prompts "a cat" --seeds 0 1 --out DIR '
    "(gflowdiff sample --help)\n"
)


def console_main() -> None:
    """The ``gflowdiff`` console script (returns nothing: a returned object would become the exit status).

    ``gflowdiff`` / ``-h`` / ``--help``: the overview (overview.py); ``objectives`` / ``rewards``: the plugin lists;
    ``sample``: PNGs of a checkpoint's samples (sample_images.py); ``compare``: the ablation command
    (experiments/compare.py); everything else (fit, validate, test) is LightningCLI's."""
    command = sys.argv[1:2]
    if command in ([], ["-h"], ["--help"]):
        from gflowdiff.overview import print_overview

        print_overview()
    elif command in (["objectives"], ["rewards"]):
        from gflowdiff.overview import print_plugins

        print_plugins(command[0].removesuffix("s"))
    elif command == ["sample"]:
        from gflowdiff.sample_images import main as sample_main

        sample_main(sys.argv[2:])
    elif command == ["compare"]:
        from gflowdiff.experiments.compare import main as compare_main

        compare_main(sys.argv[2:])
    elif command == ["predict"]:
        sys.stderr.write(PREDICT_REPLACED)
        sys.exit(2)
    else:
        main()


if __name__ == "__main__":
    console_main()
