"""How each parameter is cut into preconditioned blocks.

A parameter's size-1 dimensions are dropped and adjacent small dimensions merged (a
``[64, 64, 3, 3]`` kernel becomes ``[64, 576]``), keeping at least two dimensions so a
matrix keeps its two Kronecker factors. Every merged dimension above
``max_preconditioner_dim`` is cut into chunks of that size; each combination of chunks is
one block with one statistic per dimension. Parameters with fewer than two dimensions of
size > 1, or with a dimension above ``max_preconditioned_dim`` (embeddings, output
layers), are not blocked: they get the grafted diagonal step only.

Each :class:`Block` carries a name that says which parameter and which slice it is, so a
failure can point at it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Block:
    """One preconditioned block: a slice of a parameter's merged shape."""

    name: str
    slices: tuple[slice, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TileGroup:
    """Blocks of one shape that tile a region of the merged tensor as a grid.

    ``blocks`` lists their indices in row-major grid order; :meth:`view` gives all of them
    as one strided view, so they move in one copy instead of one per block.
    """

    region: tuple[slice, ...]
    counts: tuple[int, ...]  # blocks along each dimension
    shape: tuple[int, ...]  # the block shape
    blocks: tuple[int, ...]

    def view(self, merged: Tensor) -> Tensor:
        """``(*counts, *shape)`` view of the group's blocks of a merged-shape tensor."""
        grid = merged[self.region]
        for dim, (count, size) in enumerate(zip(self.counts, self.shape)):
            grid = grid.unflatten(2 * dim, (count, size))
        order = len(self.shape)
        return grid.permute(*range(0, 2 * order, 2), *range(1, 2 * order, 2))


@dataclass(frozen=True)
class ParamBlocking:
    """A parameter's merged shape and blocks; no blocks means the diagonal (grafted) step only."""

    name: str
    shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    block_size: int = 0

    def tile_groups(self) -> list[TileGroup]:
        """The blocks as grids of equal blocks: full chunks or the remainder, along each dimension."""
        chunks = [math.ceil(size / self.block_size) for size in self.merged_shape]
        kinds = []  # per dimension: (region slice, chunk indices, block size) of each kind
        for size, count in zip(self.merged_shape, chunks):
            full = size // self.block_size
            dim_kinds = []
            if full:
                dim_kinds.append((slice(0, full * self.block_size), range(full), self.block_size))
            if size % self.block_size:
                dim_kinds.append(
                    (
                        slice(full * self.block_size, size),
                        range(full, count),
                        size % self.block_size,
                    )
                )
            kinds.append(dim_kinds)
        groups = []
        for combination in itertools.product(*kinds):
            indices = itertools.product(*(chunk_indices for _, chunk_indices, _ in combination))
            groups.append(
                TileGroup(
                    region=tuple(region for region, _, _ in combination),
                    counts=tuple(len(chunk_indices) for _, chunk_indices, _ in combination),
                    shape=tuple(size for _, _, size in combination),
                    blocks=tuple(_row_major(index, chunks) for index in indices),
                )
            )
        return groups

    @property
    def preconditioned(self) -> bool:
        return bool(self.blocks)


def _row_major(index: tuple[int, ...], counts: list[int]) -> int:
    flat = 0
    for i, count in zip(index, counts):
        flat = flat * count + i
    return flat


def _greedy_merge(shape: tuple[int, ...], max_dim: int) -> list[int]:
    merged: list[int] = []
    product = 1
    for size in shape:
        if product * size <= max_dim:
            product *= size
        else:
            if product > 1:
                merged.append(product)
            product = size
    if product > 1:
        merged.append(product)
    return merged


def merge_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dims, then merge adjacent dims while their product stays <= ``max_dim``.

    A tensor with at least two dims of size > 1 keeps at least two (its last dim stays
    apart), so small matrices keep left and right factors instead of becoming one
    full-matrix vector preconditioner.
    """
    squeezed = tuple(size for size in shape if size > 1)
    merged = _greedy_merge(squeezed, max_dim)
    if len(squeezed) >= 2 and len(merged) < 2:
        merged = [*_greedy_merge(squeezed[:-1], max_dim), squeezed[-1]]
    return tuple(merged)


def _chunks(size: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, size)) for start in range(0, size, block)]


def _format_slices(slices: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "]"


def plan_blocking(
    name: str, shape: tuple[int, ...], max_preconditioner_dim: int, max_preconditioned_dim: int
) -> ParamBlocking:
    """Blocks of a parameter of ``shape`` (see the module docstring for the rules)."""
    squeezed = tuple(size for size in shape if size > 1)
    if len(squeezed) < 2 or max(squeezed) > max_preconditioned_dim:
        return ParamBlocking(name=name, shape=tuple(shape), merged_shape=(), blocks=())
    merged = merge_dims(shape, max_preconditioner_dim)
    grid = list(itertools.product(*(_chunks(size, max_preconditioner_dim) for size in merged)))
    blocks = tuple(
        Block(
            name=f"{name} block {index} of {len(grid)}: slice {_format_slices(slices)} of merged shape {list(merged)}",
            slices=slices,
            shape=tuple(s.stop - s.start for s in slices),
        )
        for index, slices in enumerate(grid)
    )
    return ParamBlocking(
        name=name,
        shape=tuple(shape),
        merged_shape=merged,
        blocks=blocks,
        block_size=max_preconditioner_dim,
    )
