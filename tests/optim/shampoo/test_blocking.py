"""Dimension merging and blocking: every element lands in exactly one block, names say where."""

import math

import pytest
import torch

from largebatch.optim.shampoo.blocking import merge_dims, plan_blocking


@pytest.mark.parametrize(
    ("shape", "max_dim", "merged"),
    [
        ((64, 64, 3, 3), 1024, (64, 576)),  # conv kernel: the spatial dims join the input channels
        ((256, 64, 1, 1), 1024, (256, 64)),  # size-1 dims disappear
        ((10, 20), 1024, (10, 20)),  # a small matrix keeps both factors
        ((4, 5, 6), 1024, (20, 6)),  # ... and so does a small 3-D tensor
        ((3, 4, 5), 5, (3, 4, 5)),  # nothing fits together
        ((2048, 1000), 1024, (2048, 1000)),  # large dims are blocked, not merged
        ((1, 768), 1024, (768,)),
    ],
)
def test_merge_dims(shape, max_dim, merged):
    assert merge_dims(shape, max_dim) == merged


@pytest.mark.parametrize("shape", [(7, 10), (64, 3, 7, 7), (2500, 300), (5, 6, 7)])
def test_blocks_cover_every_element_exactly_once(shape):
    blocking = plan_blocking(
        "w",
        shape,
        max_preconditioner_dim=4 if len(shape) == 2 else 128,
        max_preconditioned_dim=8192,
    )
    assert blocking.preconditioned
    merged = torch.arange(math.prod(shape)).reshape(blocking.merged_shape)
    pieces = {}
    for group in blocking.tile_groups():  # grids of equal blocks, one strided view each
        stacked = group.view(merged).reshape(-1, *group.shape)
        pieces.update(zip(group.blocks, stacked))
    assert sorted(pieces) == list(range(len(blocking.blocks)))
    covered = torch.cat([p.reshape(-1) for p in pieces.values()]).sort().values
    assert torch.equal(covered, torch.arange(math.prod(shape)))
    for index, block in enumerate(blocking.blocks):
        assert torch.equal(pieces[index], merged[block.slices])
        assert max(block.shape) <= max(4 if len(shape) == 2 else 128, 1)
        assert block.name.startswith("w block ")


def test_tile_groups_are_views_so_updates_land_in_the_parameter():
    blocking = plan_blocking("w", (6, 10), max_preconditioner_dim=4, max_preconditioned_dim=8192)
    tensor = torch.zeros(6, 10)
    groups = blocking.tile_groups()
    for group in groups:
        group.view(tensor).add_(1.0)
    assert torch.equal(tensor, torch.ones(6, 10))
    assert [b.shape for b in blocking.blocks] == [(4, 4), (4, 4), (4, 2), (2, 4), (2, 4), (2, 2)]
    assert [(g.counts, g.shape, g.blocks) for g in groups] == [
        ((1, 2), (4, 4), (0, 1)),
        ((1, 1), (4, 2), (2,)),
        ((1, 2), (2, 4), (3, 4)),
        ((1, 1), (2, 2), (5,)),
    ]
    assert "[4:6, 8:10]" in blocking.blocks[-1].name


@pytest.mark.parametrize("shape", [(768,), (1, 768), (), (50000, 64), (9000, 10)])
def test_vectors_and_huge_dimensions_get_the_diagonal_step_only(shape):
    assert not plan_blocking(
        "w", shape, max_preconditioner_dim=1024, max_preconditioned_dim=8192
    ).preconditioned
