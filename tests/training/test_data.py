"""Prompt batches: reproducible, distinct per rank, and resumable exactly despite Lightning's one-batch prefetch."""

from __future__ import annotations

import pytest

from gflowdiff.training.data import PromptBatches, PromptDataModule
from gflowdiff.training.prompts import ANIMALS


def take(batches: PromptBatches, n: int, prefetch: int = 1) -> list[list[str]]:
    """Consume n batches the way Lightning does: the iterator is always `prefetch` batches ahead of the step."""
    iterator = iter(batches)
    queue = [next(iterator) for _ in range(prefetch)]
    taken = []
    for _ in range(n):
        queue.append(next(iterator))
        taken.append(queue.pop(0).prompts())
    return taken


def test_state_counts_trained_batches_not_prefetched_ones():
    batches = PromptBatches(ANIMALS, batch_size=4, seed=0, rank=0)
    first = take(batches, 3)
    assert batches.state_dict() == {"position": 3}  # 4 batches were yielded, 3 were trained on

    resumed = PromptBatches(ANIMALS, batch_size=4, seed=0, rank=0)
    resumed.load_state_dict(batches.state_dict())
    uninterrupted = PromptBatches(ANIMALS, batch_size=4, seed=0, rank=0)
    assert take(resumed, 2) == take(uninterrupted, 5)[3:]
    assert take(PromptBatches(ANIMALS, 4, 0, 0), 3) == first  # a pure function of (seed, rank, index)


def test_ranks_and_seeds_draw_different_prompts():
    rank0 = take(PromptBatches(ANIMALS, 8, seed=0, rank=0), 2)
    rank1 = take(PromptBatches(ANIMALS, 8, seed=0, rank=1), 2)
    other_seed = take(PromptBatches(ANIMALS, 8, seed=1, rank=0), 2)
    assert rank0 != rank1 and rank0 != other_seed


def test_eval_batches_cycle_the_eval_prompts():
    data = PromptDataModule(
        train_prompts="animals", eval_prompts="digits:classes", eval_batch_size=4, num_eval_batches=3
    )
    batches = data.val_dataloader()
    assert [len(b) for b in batches] == [4, 4, 4]
    assert batches[2][3] == "a handwritten digit 1"  # index 11 of the cycled 10 prompts → prompt 1


def test_bad_batch_size_names_the_option():
    with pytest.raises(ValueError, match="--data.batch_size"):
        PromptDataModule(batch_size=0)
