"""What a gflowdiff run prints: the known, harmless warnings of Lightning and transformers silenced by narrow filters
(message and category), and a progress bar that counts optimizer steps against ``--trainer.max_steps``.

Each filter says why its message does not apply to gflowdiff. Anything else still prints.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import TQDMProgressBar

KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "Lightning's own _pytree helper calls torch's deprecated API; nothing a gflowdiff user can act on.",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        PossibleUserWarning,
        "by design: the frozen UNet base, VAE, text encoder and reward stay in eval mode; LoRA and flow head train.",
    ),
    (
        r"The `srun` command is available on your system but is not used",
        PossibleUserWarning,
        "a run started without srun is a single-process run, as intended; configs/slurm/ launch through srun.",
    ),
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        UserWarning,
        "gflowdiff's training_step is the whole step (rollout, loss, optimizer.step): the state after it is the "
        "state the next step starts from, which is what a checkpoint must hold.",
    ),
]

KNOWN_LOG_LINES: dict[str, list[tuple[str, str]]] = {
    "lightning.pytorch.utilities.rank_zero": [
        (r"💡 Tip: For seamless cloud logging", "an advert for an optional package (litlogger); TensorBoard logs."),
    ],
    "lightning.fabric.utilities.rank_zero": [
        (r"💡 Tip: For seamless cloud logging", "the same advert, when Fabric's rank-zero logger is the active one."),
    ],
    "transformers.utils.import_utils": [
        (
            r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
            "gflowdiff's rewards preprocess images themselves (rewards/preprocessing.py), never through an image "
            "processor; the fallback is transformers' lazy import of its namespace.",
        ),
    ],
}


class DropKnownLines(logging.Filter):
    """Drops the records whose message matches one of ``patterns`` (``re.match``, from the start)."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def silence_known_messages() -> None:
    """Install the warning filters and log filters above (idempotent: a logger gets one gflowdiff filter)."""
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, lines in KNOWN_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownLines) for f in logger.filters):
            logger.addFilter(DropKnownLines([pattern for pattern, _why in lines]))


class StepProgressBar(TQDMProgressBar):
    """TQDM's bar counting optimizer steps, ``Training: 154/1000``, across epochs and from the resumed step;
    Lightning's default counts batches of an epoch against a total it cannot know here ("Epoch 0/-2", "154/3")."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step  # a resumed run continues its count
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        """One bar for the whole run: nothing to reset at an epoch boundary."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
