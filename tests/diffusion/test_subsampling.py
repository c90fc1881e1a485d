"""Which sampler steps are trained on (docs/method.md §2.10): the terminal step plus int(T·fraction) others."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.subsampling import flatten_steps, num_trained_steps, subsample_steps


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("num_steps", "fraction", "expected"),
    [
        (50, 0.1, 6),  # int(50·0.1) + 1 = 5 + 1 (the reference's default: 6 transitions per trajectory)
        (20, 0.4, 9),  # int(20·0.4) + 1 = 8 + 1 (README's 20-step DPM-Solver setting)
        (50, 1.0, 51),  # int(50·1.0) + 1 = 50 + 1
        (50, 0.01, 2),  # int(0.5) = 0 is raised to one non-terminal step: max(1, 0) + 1
    ],
)
def test_num_trained_steps(num_steps, fraction, expected):
    assert num_trained_steps(num_steps, fraction) == expected


@pytest.mark.parametrize("low_variance", [True, False])
def test_shape_and_terminal_column(low_variance):
    steps = subsample_steps(50, 7, 0.1, low_variance, generator())
    # (B, K) with K = int(50·0.1) + 1 = 6
    assert steps.shape == (7, 6) and steps.dtype == torch.long
    # column 0 is always the terminal step T − 1 = 49
    assert (steps[:, 0] == 49).all()


def test_low_variance_one_draw_per_chunk_cleanest_first():
    steps = subsample_steps(50, 1000, 0.1, True, generator())
    # n = 5 chunks of 10 steps; column k ≥ 1 draws from chunk 5 − k: [40, 49], [30, 39], …, [0, 9]
    for k in range(1, 6):
        low = 10 * (5 - k)
        column = steps[:, k]
        assert ((column >= low) & (column <= low + 9)).all()
        # uniform within the chunk: 1000 draws cover all 10 values (P(a value is missed) ≈ 10·0.9¹⁰⁰⁰ ≈ 0)
        assert set(column.tolist()) == set(range(low, low + 10))


def test_low_variance_uneven_chunks():
    steps = subsample_steps(20, 500, 0.15, True, generator())
    # n = int(20·0.15) = 3; arange(20).tensor_split(3) → [0..6], [7..13], [14..19] (sizes 7, 7, 6)
    assert steps.shape == (500, 4)
    for k, (low, high) in enumerate([(14, 19), (7, 13), (0, 6)], start=1):
        assert set(steps[:, k].tolist()) == set(range(low, high + 1))


def test_low_variance_terminal_can_be_drawn_twice():
    steps = subsample_steps(50, 1000, 0.1, True, generator())
    # the cleanest chunk [40, 49] contains the terminal step, as in the reference (expected count 1000/10 = 100)
    assert (steps[:, 1] == 49).any()


def test_non_low_variance_draws_are_distinct_non_terminal_steps():
    steps = subsample_steps(50, 500, 0.1, False, generator())
    others = steps[:, 1:]
    # drawn from 0..T−2 = 0..48: never the terminal step
    assert ((others >= 0) & (others <= 48)).all()
    # distinct within each trajectory (a truncated permutation)
    assert all(len(set(row)) == 5 for row in others.tolist())
    # 500·5 = 2500 draws over 49 values cover them all
    assert set(others.flatten().tolist()) == set(range(49))


def test_non_low_variance_full_fraction_uses_every_step_once():
    steps = subsample_steps(50, 3, 1.0, False, generator())
    # only 49 non-terminal steps exist, so the draw stops at 1 + 49 = 50 columns (not K = 51): each step once
    assert steps.shape == (3, 50)
    assert all(sorted(row) == list(range(50)) for row in steps.tolist())


def test_single_step_trajectory():
    # T = 1: only the terminal step exists (index 0)
    assert subsample_steps(1, 2, 0.5, False, generator()).tolist() == [[0], [0]]
    # low variance: one chunk [0], so the draw repeats the terminal step
    assert subsample_steps(1, 2, 0.5, True, generator()).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("low_variance", [True, False])
def test_deterministic_given_the_generator(low_variance):
    first = subsample_steps(50, 16, 0.1, low_variance, generator(123))
    second = subsample_steps(50, 16, 0.1, low_variance, generator(123))
    other = subsample_steps(50, 16, 0.1, low_variance, generator(124))
    assert torch.equal(first, second)
    # 16·5 draws from 10 (or 49) values: two seeds agreeing everywhere has probability ≤ 10⁻⁸⁰
    assert not torch.equal(first, other)


def assert_rows_drawn_independently(steps: torch.Tensor, choices_per_column: int) -> None:
    """64 rows of independent draws: hardly any two rows are equal (each has ≥ 10⁵ combinations: a repeat has
    probability ≈ 2 %), and each drawn column takes most of its values (64 draws of 10 values miss one with
    probability ≈ 1 %), not one value copied down the batch."""
    rows = {tuple(row) for row in steps.tolist()}
    assert len(rows) >= steps.shape[0] - 2, f"only {len(rows)} distinct rows of {steps.shape[0]}"
    for column in steps[:, 1:].T:
        assert len(set(column.tolist())) >= choices_per_column - 2


@pytest.mark.parametrize("low_variance", [True, False])
def test_draws_are_independent_per_trajectory(low_variance):
    steps = subsample_steps(50, 64, 0.1, low_variance, generator())  # 5 chunks of 10 steps, or 5 of 49 steps
    assert_rows_drawn_independently(steps, choices_per_column=10)


def test_the_independence_check_fails_when_rows_are_copies():
    steps = subsample_steps(50, 64, 0.1, True, generator())
    copied = steps[:1].repeat(64, 1)
    copied[:2] = steps[:2]  # only 2 of 64 rows differ from the rest
    with pytest.raises(AssertionError, match="distinct rows"):
        assert_rows_drawn_independently(copied, choices_per_column=10)


def test_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    subsample_steps(50, 8, 0.1, True, generator())
    subsample_steps(50, 8, 0.1, False, generator())
    # all randomness comes from the explicit generator
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
@pytest.mark.parametrize("low_variance", [True, False])
def test_bad_fraction_raises(fraction, low_variance):
    with pytest.raises(ValueError, match="--model.objective.timestep_fraction"):
        subsample_steps(50, 2, fraction, low_variance, generator())


def test_flatten_steps_is_trajectory_major():
    steps = torch.tensor([[49, 3, 12], [49, 7, 40]])
    trajectory, step = flatten_steps(steps)
    # (B, K) = (2, 3) → B·K = 6 rows: trajectory 0's three steps, then trajectory 1's
    assert trajectory.tolist() == [0, 0, 0, 1, 1, 1]
    assert step.tolist() == [49, 3, 12, 49, 7, 40]
    # round trip: steps[trajectory[i], i mod K] == step[i]
    assert torch.equal(steps[trajectory, torch.arange(6) % 3], step)


@pytest.mark.parametrize("low_variance", [True, False])
def test_adjacent_pairs_tile_the_steps_from_the_end(low_variance):
    steps = subsample_steps(50, 2000, 0.1, low_variance, generator(), adjacent_pairs=True)
    # K = 6 → P = 3 pairs; the terminal pair (49, 48) comes first
    assert steps.shape == (2000, 6)
    assert (steps[:, 0] == 49).all() and (steps[:, 1] == 48).all()
    pairs = steps.view(2000, 3, 2)
    assert (pairs[..., 0] - pairs[..., 1] == 1).all()  # each pair is (j + 1, j): x' of step j is x of step j + 1
    assert (pairs[..., 0] % 2 == 1).all()  # aligned from the end, T − 1 − 2p, so pairs never overlap
    assert all(len(set(row)) == 6 for row in steps.tolist())  # distinct steps within a trajectory
    # every step is trained by some trajectory (pairs 1..24 are drawn; 2000·2 draws)
    assert set(steps.flatten().tolist()) == set(range(50))


def test_adjacent_pairs_low_variance_stratifies_the_pairs():
    steps = subsample_steps(50, 1000, 0.1, True, generator(), adjacent_pairs=True)
    # pairs 1..24 split into 2 chunks: 1..12 (steps 47..24) then 13..24 (steps 23..0), cleanest first
    assert set(steps[:, 2].tolist()) == set(range(25, 48, 2)) and set(steps[:, 4].tolist()) == set(range(1, 24, 2))


def test_adjacent_pairs_odd_and_tiny_step_counts():
    # T = 5: pairs (4, 3) and (2, 1); step 0 belongs to none
    steps = subsample_steps(5, 200, 1.0, True, generator(), adjacent_pairs=True)
    assert steps.shape == (200, 4) and set(steps.flatten().tolist()) == {1, 2, 3, 4}
    assert subsample_steps(1, 2, 0.5, True, generator(), adjacent_pairs=True).tolist() == [[0], [0]]
    assert subsample_steps(2, 1, 0.1, False, generator(), adjacent_pairs=True).tolist() == [[1, 0]]
