"""Neighbour averaging on ``torch.distributed``: ``x_i <- sum_j w_ij x_j`` for a :class:`Topology`.

One gossip round flattens the tensors into one contiguous buffer per device and dtype,
posts every send and receive of the round together with ``dist.batch_isend_irecv``
(posting both directions at once cannot deadlock, whatever the order of the ranks),
waits, and forms ``w_ii x_i + sum_j w_ij x_j`` in the order the topology lists the
sources, so a run is reproducible bit for bit. The complete graph is one ``all_reduce``
instead. Works with any backend that has point-to-point operations: gloo for CPU
tensors, NCCL for CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.optim.decentralized.topology import Topology, make_topology

Bucket = tuple[Tensor, list[Tensor]]


def flatten(tensors: Sequence[Tensor], buffers: dict | None = None) -> list[Bucket]:
    """``tensors`` copied into one flat buffer per (device, dtype): ``[(buffer, members)]``.

    With ``buffers`` (a dict kept by the caller) a buffer of the same device, dtype and
    size is reused from one call to the next instead of allocated.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    buckets = []
    for (device, dtype), members in groups.items():
        pieces = [t.reshape(-1) for t in members]
        if buffers is None:
            buckets.append((torch.cat(pieces), members))
            continue
        key = ("flat", device, dtype, sum(p.numel() for p in pieces))
        if key not in buffers:
            buffers[key] = torch.empty(key[3], dtype=dtype, device=device)
        buckets.append((torch.cat(pieces, out=buffers[key]), members))
    return buckets


def unflatten_(buckets: Sequence[Bucket]) -> None:
    """Copy each buffer back into its member tensors."""
    for flat, members in buckets:
        pieces = flat.split([t.numel() for t in members])
        torch._foreach_copy_(members, [p.view_as(t) for p, t in zip(pieces, members)])


def world_size_of(group: Any = None) -> int:
    """The size of ``group`` (the default group if ``None``); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class Gossip:
    """Averages tensors with this rank's neighbours in ``topology`` (named or given), in place.

    ``group`` is the process group (default: all processes); its size must be the
    topology's. ``bytes_sent`` counts the payload this rank has sent: each send's buffer
    size; for the complete graph the ``2 (n - 1) / n`` buffers a ring all-reduce sends
    (the nominal figure: the backend's algorithm decides the actual traffic). ``rounds``
    counts the calls of :meth:`mix_`. The flat buffer and the receive buffers are kept
    from one round to the next: ``1 + in-degree`` copies of the tensors mixed.
    """

    def __init__(self, topology: str | Topology, group: Any = None) -> None:
        size = world_size_of(group)
        if isinstance(topology, str):
            topology = make_topology(topology, size)
        elif topology.world_size != size:
            raise ValueError(
                f"Invalid topology: {topology!r} for a process group of {size} process(es)"
            )
        self.topology = topology
        self.group = group
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0
        self.rounds = 0
        self._buffers: dict[tuple, Tensor] = {}

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @torch.no_grad()
    def mix_(self, tensors: Sequence[Tensor], step: int) -> None:
        """Replace every tensor by its average with the neighbours' at round ``step``.

        Every rank must call this with tensors of the same shapes and dtypes, in the
        same order, and the same ``step``. Meta tensors have no values to send: they are
        left as they are (a step on ``meta`` parameters runs without communicating).
        """
        buckets = [b for b in flatten(tensors, self._buffers) if not b[0].is_meta]
        if self.topology.all_reduce:
            n = self.topology.world_size
            for flat, _ in buckets:
                dist.all_reduce(flat, group=self.group)
                flat.div_(n)
                self.bytes_sent += 2 * (n - 1) * flat.numel() * flat.element_size() // n
        else:
            self._exchange(buckets, step)
        unflatten_(buckets)
        self.rounds += 1

    def _exchange(self, buckets: list[Bucket], step: int) -> None:
        peers = self.topology.peers(self.rank, step)
        received = [
            [self._inbox(flat, index) for index in range(len(peers.sources))] for flat, _ in buckets
        ]
        operations = []
        for tag, ((flat, _), inbox) in enumerate(zip(buckets, received)):
            for destination in peers.destinations:
                operations.append(
                    dist.P2POp(dist.isend, flat, self._global_rank(destination), self.group, tag)
                )
                self.bytes_sent += flat.numel() * flat.element_size()
            for (source, _), buffer in zip(peers.sources, inbox):
                operations.append(
                    dist.P2POp(dist.irecv, buffer, self._global_rank(source), self.group, tag)
                )
        for request in dist.batch_isend_irecv(operations) if operations else ():
            request.wait()
        for (flat, _), inbox in zip(buckets, received):
            flat.mul_(peers.self_weight)
            for (_, weight), buffer in zip(peers.sources, inbox):
                flat.add_(buffer, alpha=weight)

    def _inbox(self, flat: Tensor, index: int) -> Tensor:
        """The ``index``-th receive buffer shaped like ``flat`` (kept between rounds)."""
        key = ("inbox", flat.device, flat.dtype, flat.numel(), index)
        if key not in self._buffers:
            self._buffers[key] = torch.empty_like(flat)
        return self._buffers[key]
