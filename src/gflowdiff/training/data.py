"""The prompt DataModule: endless, reproducible batches of prompts, distinct on every rank."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch

from gflowdiff.training.prompts import load_prompts


def batch_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The generator of batch ``index`` on ``rank``: a pure function of the three, so a resumed run draws the same
    prompts, and ranks differ (fixes the reference's identical seeds on every rank, docs/method.md §7 item 3)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + index)


class DeferredPromptBatch:
    """A batch whose prompts are drawn only when the training step asks for them.

    Lightning prefetches one batch ahead, so a loader that counted the batches it *yielded* would be one ahead of the
    steps actually taken when a checkpoint is written, and a resumed run would skip a batch. Counting draws instead
    keeps ``PromptBatches.state_dict`` equal to the number of batches trained on: resume is exact.
    """

    def __init__(self, source: PromptBatches):
        self.source = source
        self._prompts: list[str] | None = None

    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = self.source.batch(self.source.position)
            self.source.position += 1
        return self._prompts


class PromptBatches:
    """An endless iterable of prompt batches, drawn with replacement; resumable through ``state_dict``."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int, rank: int):
        self.prompts, self.batch_size, self.seed, self.rank = prompts, batch_size, seed, rank
        self.position = 0

    def batch(self, index: int) -> list[str]:
        picks = torch.randint(
            len(self.prompts), (self.batch_size,), generator=batch_generator(self.seed, self.rank, index)
        )
        return [self.prompts[i] for i in picks.tolist()]

    def __iter__(self) -> Iterator[DeferredPromptBatch]:
        while True:
            yield DeferredPromptBatch(self)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class PromptDataModule(L.LightningDataModule):
    """Prompt batches for rollouts, and a fixed list of held-out prompts for evaluation.

    Args:
        train_prompts: a built-in set (``digits``, ``digits:classes``, ``animals``) or a prompt file (txt, csv, json,
            jsonl).
        eval_prompts: prompts for validation/test; default: the training prompts.
        batch_size: trajectories sampled per rollout, per device.
        eval_batch_size: prompts per validation batch.
        num_eval_batches: validation batches (eval prompts are cycled to fill them).
        seed: seed of the prompt draws (offset by the rank on each device).
    """

    def __init__(
        self,
        train_prompts: str = "digits",
        eval_prompts: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_eval_batches: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError("--data.batch_size must be >= 1")
        self.train_prompt_list = load_prompts(train_prompts, "--data.train_prompts")
        self.eval_prompt_list = (
            load_prompts(eval_prompts, "--data.eval_prompts") if eval_prompts else list(self.train_prompt_list)
        )
        self.batch_size, self.eval_batch_size, self.num_eval_batches = batch_size, eval_batch_size, num_eval_batches
        self.seed = seed
        self._train_batches: PromptBatches | None = None

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> PromptBatches:
        if self._train_batches is None:
            self._train_batches = PromptBatches(self.train_prompt_list, self.batch_size, self.seed, self._rank())
        return self._train_batches

    def _eval_batches(self) -> list[list[str]]:
        prompts = self.eval_prompt_list
        total = self.eval_batch_size * self.num_eval_batches
        cycled = [prompts[i % len(prompts)] for i in range(total)]
        return [cycled[i : i + self.eval_batch_size] for i in range(0, total, self.eval_batch_size)]

    def val_dataloader(self) -> list[list[str]]:
        return self._eval_batches()

    def test_dataloader(self) -> list[list[str]]:
        return self._eval_batches()
