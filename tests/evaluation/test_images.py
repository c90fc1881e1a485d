"""image_grid: the TensorBoard grid of sampled images."""

from __future__ import annotations

import torch

from gflowdiff.evaluation.images import image_grid


def test_grid_shape_with_upscaling():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 8, 8)
    grid = image_grid(images)
    # scale = ceil(64/8) = 8 → 64×64 tiles; columns = ceil(√5) = 3, rows = ceil(5/3) = 2
    # height = 2·(64+1)+1 = 131, width = 3·(64+1)+1 = 196
    assert grid.shape == (3, 131, 196)


def test_grid_shape_with_explicit_columns_and_no_upscaling():
    images = torch.rand(6, 3, 16, 16)
    grid = image_grid(images, columns=6, min_size=16, padding=2)
    # scale = ceil(16/16) = 1; one row of 6: height 1·(16+2)+2 = 20, width 6·(16+2)+2 = 110
    assert grid.shape == (3, 20, 110)


def test_gray_image_is_expanded_to_rgb_and_values_kept():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 4, 4)
    grid = image_grid(images, columns=2, min_size=4, padding=1)
    # no upscaling (scale 1): height 1·5+1 = 6, width 2·5+1 = 11, three channels
    assert grid.shape == (3, 6, 11)
    for i, left in enumerate([1, 6]):  # tile i starts at padding + i·(W + padding)
        tile = grid[:, 1:5, left : left + 4]
        # each channel repeats the gray values exactly
        for channel in range(3):
            assert torch.equal(tile[channel], images[i, 0])
    # padding and unused cells are white (1.0)
    assert (grid[:, 0, :] == 1).all() and (grid[:, :, 5] == 1).all()


def test_nearest_upscaling_preserves_pixels_and_clamps():
    images = torch.tensor([[[[0.25, 1.5], [-0.5, 0.75]]]]).expand(1, 3, 2, 2)  # (1, 3, 2, 2)
    grid = image_grid(images, min_size=4, padding=0)
    # scale = ceil(4/2) = 2: every pixel becomes a 2×2 block; values clamped to [0, 1] (1.5 → 1, −0.5 → 0)
    expected = torch.tensor(
        [[0.25, 0.25, 1.0, 1.0], [0.25, 0.25, 1.0, 1.0], [0.0, 0.0, 0.75, 0.75], [0.0, 0.0, 0.75, 0.75]]
    )
    assert grid.shape == (3, 4, 4)
    for channel in range(3):
        assert torch.equal(grid[channel], expected)


def test_input_is_not_modified_and_grad_is_detached():
    """Values outside [0, 1] (clamped in the grid), one channel (expanded to three) and upscaling: an in-place clamp
    of the input, or a grid that is a view of it or keeps its graph, shows here."""
    images = (torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    before = images.detach().clone()
    assert before.min() < 0 and before.max() > 1  # the clamp has work to do
    grid = image_grid(images, min_size=8)
    assert not grid.requires_grad and grid.grad_fn is None and grid.dtype == torch.float32
    assert 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(images.detach(), before)
    grid.fill_(0.5)
    assert torch.equal(images.detach(), before)  # the grid shares no memory with the input
