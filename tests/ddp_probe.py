"""A callback for the DDP test: each rank writes its latest rollout summary and trainable weights after every step."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items() if k in pl_module.trainable_names}
        summary = pl_module.last_rollout_summary
        torch.save(
            {"prompts": summary["prompts"], "rewards": summary["rewards"], "state": state},
            self.directory / f"rank{trainer.global_rank}_step{trainer.global_step}.pt",
        )
