"""Data-parallel root computation: each rank computes the roots of the blocks it owns.

Under data parallelism every rank holds the same (all-reduced) gradients, so statistics
are replicated and cheap; the inverse roots are the expensive part. A bucket's factors of
one dimension are cut into chunks of at most :data:`ROOT_CHUNK_COST` work (an
eigendecomposition costs ~n^3); chunks go to ranks greedily, largest first, to the least
loaded rank. Chunks do not depend on the world size and one process computes the same
chunks, so results are bitwise identical for any number of ranks (batched element-wise
kernels round differently depending on the batch they run in). After computing its
chunks a rank broadcasts the results: all ranks end with identical roots and failure
counters while none computes them all.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.optim.shampoo.config import DistributedConfig

if TYPE_CHECKING:
    from largebatch.optim.shampoo.preconditioner import KroneckerBucket

ROOT_CHUNK_COST = 1024.0**3  # the most root work handed out as one unit: one 1024 x 1024 root


def root_cost(size: int) -> float:
    """Relative cost of one ``size x size`` inverse root."""
    return float(size) ** 3


def root_chunks(count: int, size: int) -> list[range]:
    """Consecutive slots of ``count`` same-size factors, in chunks of at most ``ROOT_CHUNK_COST``."""
    per_chunk = max(1, int(ROOT_CHUNK_COST // root_cost(size)))
    return [range(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


def balanced_owners(costs: Sequence[float], loads: list[float]) -> list[int]:
    """Owner rank of each job: largest job first, to the least loaded rank (``loads`` is updated).

    Ties go to the lowest rank, so every rank computes the same assignment.
    """
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(heap)
        owners[job] = rank
        loads[rank] = load + costs[job]
        heapq.heappush(heap, (loads[rank], rank))
    return owners


@dataclass(frozen=True)
class Topology:
    """This process's place among the ranks that share root computations."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def __deepcopy__(self, memo: dict) -> Topology:
        return self  # immutable, and a process group handle cannot be copied

    @classmethod
    def resolve(cls, config: DistributedConfig | None) -> Topology:
        """The process group's topology; one rank when disabled or torch.distributed is not initialised."""
        if config is None:
            if not (dist.is_available() and dist.is_initialized()):
                return cls()
            config = DistributedConfig()
        if not config.enabled:
            return cls()
        if not dist.is_initialized():
            raise ValueError(
                f"Invalid distributed config {config!r}: torch.distributed is not initialized"
            )
        group = config.process_group
        return cls(rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group)


def broadcast_from_owners(
    entries: Sequence[tuple[int, Tensor]], topology: Topology, device: torch.device
) -> None:
    """Overwrite every ``(owner, tensor)`` entry with the owner's copy.

    Entries are packed per owner and dtype into one flat tensor on ``device`` (the
    backend's device: CPU counters travel with CUDA roots under NCCL), so there is one
    broadcast per (owner, dtype). Every rank must pass the same entries in the same order.
    """
    if topology.world_size == 1:
        return
    for owner in range(topology.world_size):
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for entry_owner, tensor in entries:
            if entry_owner == owner:
                by_dtype.setdefault(tensor.dtype, []).append(tensor)
        source = owner if topology.group is None else dist.get_global_rank(topology.group, owner)
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
            dist.broadcast(flat, src=source, group=topology.group)
            if topology.rank != owner:
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


class RootDistributor:
    """Which rank computes each root, and the sharing of the results.

    Owners are assigned once per parameter group, in the order groups are added; the
    loads carry over between groups, so ranks stay balanced across the whole model.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._loads = [0.0] * topology.world_size

    def is_mine(self, owner: int) -> bool:
        return owner == self.topology.rank

    def assign(self, buckets: Sequence[KroneckerBucket]) -> None:
        """Cut each bucket's factors into root chunks and give each chunk a rank, balancing cost."""
        chunks = [
            (bucket, dim, slots)
            for bucket in buckets
            for dim, size in enumerate(bucket.shape)
            for slots in root_chunks(len(bucket.members), size)
        ]
        costs = [len(slots) * root_cost(bucket.shape[dim]) for bucket, dim, slots in chunks]
        for (bucket, dim, slots), owner in zip(chunks, balanced_owners(costs, self._loads)):
            bucket.root_chunks[dim].append((slots, owner))

    def share(self, buckets: Sequence[KroneckerBucket]) -> None:
        """Give every rank each owner's roots and failure counters."""
        if self.topology.world_size == 1 or not buckets:
            return
        entries = []
        for bucket in buckets:
            for dim in range(len(bucket.shape)):
                for slot in range(len(bucket.members)):
                    owner = bucket.owner(dim, slot)
                    entries += [
                        (owner, bucket.roots[dim][slot]),
                        (owner, bucket.residuals[slot, dim : dim + 1]),
                        (owner, bucket.consecutive_failures[slot, dim : dim + 1]),
                        (owner, bucket.total_failures[slot, dim : dim + 1]),
                    ]
        broadcast_from_owners(entries, self.topology, buckets[0].roots[0].device)
