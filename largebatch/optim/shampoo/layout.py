"""Where a parameter group's Shampoo state lives: flat buffers per device and dtype, cut into units.

A group's parameters are split by (device, dtype) into partitions. A partition lays out
every block of its preconditioned parameters bucket by bucket (same-shape blocks stacked,
see :mod:`.preconditioner`), then its unblocked parameters, in one flat buffer per kind of
element-wise state: the gathered gradients, the momentum, the grafting state. Each block
or unblocked parameter is a *unit*, a contiguous piece of those buffers. Element-wise work
runs over the few contiguous segments of the units whose parameters have a gradient (one
segment when all have), and a bucket's blocks are a contiguous ``(count, *shape)`` view of
each buffer, ready for batched products. Scratch buffers of the same layout hold the
step's intermediate results, so a step allocates no large temporaries (on the CPU each
fresh allocation of that size costs its page faults; on CUDA a captured graph needs
fixed addresses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.shampoo.blocking import ParamBlocking, TileGroup, plan_blocking
from largebatch.optim.shampoo.grafting import GraftingRule, make_grafting
from largebatch.optim.shampoo.preconditioner import BucketMember, KroneckerBucket, split_bucket


@dataclass(frozen=True)
class Unit:
    """One block of a parameter (``block`` is its index), or a whole unblocked parameter (``None``)."""

    param: int  # index in the parameter group
    block: int | None
    offset: int  # start in the partition's flat buffers
    shape: tuple[int, ...]
    bucket: int | None = None  # index in the partition's buckets
    slot: int = 0  # row in that bucket

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BucketRun:
    """Consecutive slots ``[start, stop)`` of a bucket with a gradient; ``first`` is the first one's active-unit index."""

    bucket: int
    start: int
    stop: int
    first: int

    @property
    def units(self) -> range:
        return range(self.first, self.first + self.stop - self.start)


class ActiveSet:
    """The units of a partition whose parameters have a gradient this step, as segments and bucket runs."""

    def __init__(self, partition: Partition, params: tuple[int, ...]) -> None:
        self.params = params
        self.units = sorted(
            (unit for param in params for unit in partition.param_units[param]),
            key=lambda unit: unit.offset,
        )
        self.segments: list[tuple[int, int]] = []
        self.runs: list[BucketRun] = []
        for index, unit in enumerate(self.units):
            if self.segments and self.segments[-1][1] == unit.offset:
                self.segments[-1] = (self.segments[-1][0], unit.offset + unit.numel)
            else:
                self.segments.append((unit.offset, unit.offset + unit.numel))
            if unit.bucket is None:
                continue
            last = self.runs[-1] if self.runs else None
            if last is not None and last.bucket == unit.bucket and last.stop == unit.slot:
                self.runs[-1] = BucketRun(unit.bucket, last.start, unit.slot + 1, last.first)
            else:
                self.runs.append(BucketRun(unit.bucket, unit.slot, unit.slot + 1, index))
        position = {(unit.param, unit.block): index for index, unit in enumerate(self.units)}
        self.param_units = {
            param: [position[unit.param, unit.block] for unit in partition.param_units[param]]
            for param in params
        }

    def views(self, flat: Tensor) -> list[Tensor]:
        """The active segments of one of the partition's flat buffers."""
        return [flat[start:stop] for start, stop in self.segments]

    def unit_views(self, flat: Tensor) -> list[Tensor]:
        """One view per active unit of a flat buffer, in the unit's shape."""
        return [Partition.view(flat, unit) for unit in self.units]

    def run_view(self, flat: Tensor, run: BucketRun) -> Tensor:
        """A run's blocks of a flat buffer, stacked: ``(stop - start, *shape)``."""
        first = self.units[run.first]
        count = run.stop - run.start
        return flat[first.offset : first.offset + count * first.numel].view(count, *first.shape)


class Partition:
    """The state of a group's parameters on one device with one dtype (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[tuple[int, ParamBlocking]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        factor_dtype: torch.dtype,
        epsilon: float,
        graft_keys: tuple[str, ...],
        keep_snapshot: bool,
    ) -> None:
        self.device, self.dtype = device, dtype
        same_shape: dict[tuple[int, ...], list[BucketMember]] = {}
        for param, blocking in members:
            for index, block in enumerate(blocking.blocks):
                same_shape.setdefault(block.shape, []).append(BucketMember(param, index, block))
        self.buckets: list[KroneckerBucket] = []
        units: list[Unit] = []
        offset = 0
        for shape, blocks in same_shape.items():
            numel = math.prod(shape)
            for bucket_members in split_bucket(blocks, numel, device):
                bucket = KroneckerBucket(
                    shape,
                    bucket_members,
                    offset=offset,
                    device=device,
                    factor_dtype=factor_dtype,
                    epsilon=epsilon,
                    keep_snapshot=keep_snapshot,
                )
                for slot, member in enumerate(bucket_members):
                    units.append(
                        Unit(
                            member.param_index,
                            member.block_index,
                            offset + slot * numel,
                            shape,
                            len(self.buckets),
                            slot,
                        )
                    )
                offset += len(bucket_members) * numel
                self.buckets.append(bucket)
        for param, blocking in members:
            if not blocking.preconditioned:
                units.append(Unit(param, None, offset, blocking.shape))
                offset += math.prod(blocking.shape)
        self.param_units: dict[int, list[Unit]] = {param: [] for param, _ in members}
        for unit in sorted(units, key=lambda unit: (unit.param, unit.block or 0)):
            self.param_units[unit.param].append(unit)
        self.transfers = {
            param: self._transfers(blocking, self.param_units[param])
            for param, blocking in members
            if blocking.preconditioned
        }
        self.numel = offset

        def flat() -> Tensor:
            return torch.zeros(offset, dtype=dtype, device=device)

        self.grads = flat()  # gathered gradients
        self.momentum = flat()
        self.graft_state = {key: flat() for key in graft_keys}
        self.grafted = flat()  # the grafted update (scratch)
        self._lookahead: Tensor | None = None
        self._active: dict[tuple[int, ...], ActiveSet] = {}

    @property
    def lookahead(self) -> Tensor:
        """Scratch for Nesterov's look-ahead momentum, allocated when first used."""
        if self._lookahead is None:
            self._lookahead = torch.empty_like(self.momentum)
        return self._lookahead

    @staticmethod
    def _transfers(blocking: ParamBlocking, units: list[Unit]) -> list[tuple[TileGroup, int]]:
        """How a parameter's blocks move to and from the flat buffers: (tile group, offset) pairs.

        A group whose blocks sit one after another in one bucket moves as one strided
        copy; otherwise (a bucket boundary inside it) each of its blocks moves alone.
        """
        transfers = []
        for group in blocking.tile_groups():
            members = [units[index] for index in group.blocks]
            first = members[0]
            if all(
                unit.bucket == first.bucket and unit.offset == first.offset + i * first.numel
                for i, unit in enumerate(members)
            ):
                transfers.append((group, first.offset))
                continue
            for index, unit in zip(group.blocks, members):
                block = blocking.blocks[index]
                single = TileGroup(block.slices, (1,) * len(block.shape), block.shape, (index,))
                transfers.append((single, unit.offset))
        return transfers

    @staticmethod
    def view(flat: Tensor, unit: Unit) -> Tensor:
        """A unit's piece of a flat buffer, in the unit's shape."""
        return flat[unit.offset : unit.offset + unit.numel].view(unit.shape)

    @staticmethod
    def group_view(flat: Tensor, group: TileGroup, offset: int) -> Tensor:
        """A tile group's blocks in a flat buffer, shaped as :meth:`TileGroup.view`."""
        numel = math.prod(group.counts) * math.prod(group.shape)
        return flat[offset : offset + numel].view(*group.counts, *group.shape)

    def active_set(self, params: tuple[int, ...]) -> ActiveSet:
        """The active set for these parameters (cached: the same parameters usually have gradients)."""
        if params not in self._active:
            self._active[params] = ActiveSet(self, params)
        return self._active[params]

    def state_views(self, param: int) -> dict[str, Tensor]:
        """A parameter's state tensors, all views of this partition's buffers."""
        views: dict[str, Tensor] = {}
        for unit in self.param_units[param]:
            prefix = "" if unit.block is None else f"block_{unit.block}."
            views[prefix + "momentum"] = self.view(self.momentum, unit)
            for key, flat in self.graft_state.items():
                views[prefix + key] = self.view(flat, unit)
            if unit.bucket is not None:
                views.update(self.buckets[unit.bucket].member_state(unit.slot))
        return views


class GroupLayout:
    """A parameter group's blocking, grafting rule and partitions; ``buckets`` lists every partition's buckets."""

    def __init__(self, group_index: int, group: dict[str, Any]) -> None:
        params: list[Tensor] = group["params"]
        names = group.get("param_names") or [
            f"param_groups[{group_index}].params[{i}] {list(p.shape)}" for i, p in enumerate(params)
        ]
        self.blockings = [
            plan_blocking(
                name,
                tuple(p.shape),
                group["max_preconditioner_dim"],
                group["max_preconditioned_dim"],
            )
            for name, p in zip(names, params)
        ]
        self.grafting: GraftingRule = make_grafting(group["grafting"])
        members: dict[tuple[torch.device, torch.dtype], list[tuple[int, ParamBlocking]]] = {}
        for index, (param, blocking) in enumerate(zip(params, self.blockings)):
            members.setdefault((param.device, param.dtype), []).append((index, blocking))
        self.partitions = [
            Partition(
                part_members,
                device=device,
                dtype=dtype,
                factor_dtype=group["factor_dtype"],
                epsilon=group["epsilon"],
                graft_keys=self.grafting.state_keys,
                keep_snapshot=group["staleness"] > 0,
            )
            for (device, dtype), part_members in members.items()
        ]
        self.partition_of = {param: part for part in self.partitions for param in part.param_units}
        self.buckets = [bucket for part in self.partitions for bucket in part.buckets]

    def state_views(self, param: int) -> dict[str, Tensor]:
        return self.partition_of[param].state_views(param)

    def ensure_snapshots(self) -> bool:
        """Allocate missing snapshot buffers (staleness raised, or a loaded state); True if any were."""
        return any([bucket.ensure_snapshots() for bucket in self.buckets])
