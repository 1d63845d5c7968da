"""When inverse roots are recomputed and installed, and how their failures are counted.

Every ``precondition_frequency`` steps of a group the scheduler takes a snapshot of the
statistics (after the step's statistics update) and computes their inverse roots: in the
step itself with ``staleness = 0``, otherwise from the snapshot, on the root worker's
thread when asynchronous, installing them exactly ``staleness`` steps later. Each rank
computes only the roots it owns and the distributor shares them (see :mod:`.distributed`).
A failed root keeps the previous one; a factor that fails more than
``max_consecutive_failures`` times in a row raises :class:`RootComputationError`.

The group's schedule lives in its first parameter's state: ``group_step`` (steps with any
gradient), ``roots_step`` (the step whose statistics the roots in use come from) and
``pending_roots_step`` (the snapshot's step while a computation is pending).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.shampoo.config import RootConfig
from largebatch.optim.shampoo.distributed import RootDistributor
from largebatch.optim.shampoo.matrix_roots import RootResult, inverse_roots
from largebatch.optim.shampoo.preconditioner import KroneckerBucket
from largebatch.optim.shampoo.root_worker import RootWorker

NO_STEP = -1  # "no roots yet" / "no computation pending"
COUNTERS = ("group_step", "roots_step", "pending_roots_step")


class RootComputationError(RuntimeError):
    """A block's inverse root failed more often in a row than ``max_consecutive_failures``."""


@dataclass(frozen=True)
class FactorReport:
    """Health of one Kronecker factor's inverse root."""

    block: str
    dim: int
    size: int
    owner: int
    residual: float
    consecutive_failures: int
    total_failures: int


# (bucket index, dim, slots, matrices) for every root chunk a rank computes; the result
# replaces the matrices with their RootResult.
_RootBatch = tuple[int, int, range, Tensor]
_RootBatchResult = tuple[int, int, range, RootResult]


def new_counters() -> dict[str, Tensor]:
    """A group's schedule before its first step."""
    return {
        "group_step": torch.tensor(0, dtype=torch.int64),
        "roots_step": torch.tensor(NO_STEP, dtype=torch.int64),
        "pending_roots_step": torch.tensor(NO_STEP, dtype=torch.int64),
    }


def _compute_roots(
    batches: list[_RootBatch], exponents: list[int], config: RootConfig
) -> list[_RootBatchResult]:
    """The inverse roots of a rank's chunks (run on the root thread or in the step)."""
    return [
        (bucket, dim, slots, inverse_roots(matrices, exponents[bucket], config))
        for bucket, dim, slots, matrices in batches
    ]


class RootScheduler:
    """Schedules, computes (via the worker and the distributor) and installs every group's roots."""

    def __init__(self, asynchronous: bool, distributor: RootDistributor) -> None:
        self.asynchronous = asynchronous
        self.distributor = distributor
        self.worker = RootWorker()
        self.factors_computed = 0

    @staticmethod
    def event_due(group: dict[str, Any], counters: dict[str, Tensor], step: int) -> bool:
        """Whether :meth:`update` installs or starts a computation at ``step``."""
        if step % group["precondition_frequency"] == 0:
            return True
        pending = int(counters["pending_roots_step"])
        return pending != NO_STEP and step >= pending + group["staleness"]

    def update(
        self,
        key: int,
        group: dict[str, Any],
        buckets: Sequence[KroneckerBucket],
        counters: dict[str, Tensor],
        step: int,
    ) -> None:
        """Install due roots, then start the next computation when the schedule says so."""
        if not buckets:
            return
        staleness = group["staleness"]
        pending = int(counters["pending_roots_step"])
        if pending != NO_STEP:
            if self.asynchronous and not self.worker.has_job(key):
                self._submit(key, group, buckets)  # e.g. resumed from a state_dict
            # Due after `staleness` steps, and at the latest when the next computation starts
            # (staleness may have been raised since): one computation in flight per group.
            if step >= pending + staleness or step % group["precondition_frequency"] == 0:
                results = (
                    self.worker.result(key)
                    if self.asynchronous
                    else _compute_roots(*self._batches(group, buckets, snapshot=True))
                )
                self._install(group, buckets, counters, results, pending)
                counters["pending_roots_step"].fill_(NO_STEP)
        if step % group["precondition_frequency"] == 0:
            if staleness == 0:
                results = _compute_roots(*self._batches(group, buckets, snapshot=False))
                self._install(group, buckets, counters, results, step)
                return
            for bucket in buckets:
                for snapshot, factor in zip(bucket.snapshots, bucket.factors):
                    snapshot.copy_(factor)
            counters["pending_roots_step"].fill_(step)
            if self.asynchronous:
                self._submit(key, group, buckets)

    def busy(self, key: int) -> bool:
        """Whether a computation for group ``key`` is running on the worker."""
        return self.worker.has_job(key)

    def discard_all(self) -> None:
        self.worker.discard_all()

    def _batches(
        self, group: dict[str, Any], buckets: Sequence[KroneckerBucket], snapshot: bool
    ) -> tuple[list[_RootBatch], list[int], RootConfig]:
        """This rank's root chunks: views of the statistics or of their snapshot."""
        batches = []
        for index, bucket in enumerate(buckets):
            sources = bucket.snapshots if snapshot else bucket.factors
            for dim, source in enumerate(sources):
                for slots, owner in bucket.root_chunks[dim]:
                    if self.distributor.is_mine(owner):
                        batches.append((index, dim, slots, source[slots.start : slots.stop]))
        return batches, [b.exponent for b in buckets], group["roots"]

    def _submit(self, key: int, group: dict[str, Any], buckets: Sequence[KroneckerBucket]) -> None:
        batches, exponents, config = self._batches(group, buckets, snapshot=True)
        device = buckets[0].factors[0].device
        self.worker.submit(key, lambda: _compute_roots(batches, exponents, config), device)

    def _install(
        self,
        group: dict[str, Any],
        buckets: Sequence[KroneckerBucket],
        counters: dict[str, Tensor],
        results: list[_RootBatchResult],
        source_step: int,
    ) -> None:
        """Adopt each successful root, keep the previous one on failure, share across ranks."""
        for bucket_index, dim, slots, result in results:
            bucket = buckets[bucket_index]
            current = bucket.roots[dim]
            index = torch.tensor(list(slots), device=current.device)
            new_roots = result.roots.to(current.dtype)
            if new_roots.is_cuda:
                new_roots.record_stream(torch.cuda.current_stream(new_roots.device))
            keep = result.ok.to(current.device).view(-1, 1, 1)
            current.index_copy_(
                0, index, torch.where(keep, new_roots, current.index_select(0, index))
            )
            rows = torch.tensor(list(slots))
            bucket.residuals[rows, dim] = result.residuals
            failed = ~result.ok
            bucket.consecutive_failures[rows, dim] = torch.where(
                failed, bucket.consecutive_failures[rows, dim] + 1, 0
            )
            bucket.total_failures[rows, dim] += failed.long()
            self.factors_computed += len(slots)
        self.distributor.share(buckets)
        counters["roots_step"].fill_(source_step)
        _raise_on_repeated_failures(buckets, group["roots"].max_consecutive_failures)


def _raise_on_repeated_failures(buckets: Sequence[KroneckerBucket], limit: int) -> None:
    for bucket in buckets:
        failing = (bucket.consecutive_failures > limit).nonzero()
        if len(failing):
            slot, dim = (int(v) for v in failing[0])
            raise RootComputationError(
                f"Shampoo: the inverse root of {bucket.members[slot].block.name}, dimension {dim} "
                f"({bucket.shape[dim]}x{bucket.shape[dim]}), failed "
                f"{int(bucket.consecutive_failures[slot, dim])} times in a row (last residual "
                f"{float(bucket.residuals[slot, dim]):.3g}); its statistics are probably not finite. "
                "Lower the learning rate, clip gradients, or raise start_preconditioning_step."
            )


def failure_count(buckets: Sequence[KroneckerBucket]) -> int:
    """Inverse-root computations rejected so far."""
    return sum(int(bucket.total_failures.sum()) for bucket in buckets)


def factor_reports(buckets: Sequence[KroneckerBucket]) -> list[FactorReport]:
    """Residual, owner and failure counts of every factor's inverse root."""
    return [
        FactorReport(
            block=member.block.name,
            dim=dim,
            size=size,
            owner=bucket.owner(dim, slot),
            residual=float(bucket.residuals[slot, dim]),
            consecutive_failures=int(bucket.consecutive_failures[slot, dim]),
            total_failures=int(bucket.total_failures[slot, dim]),
        )
        for bucket in buckets
        for slot, member in enumerate(bucket.members)
        for dim, size in enumerate(bucket.shape)
    ]
