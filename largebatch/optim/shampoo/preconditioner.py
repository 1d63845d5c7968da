"""Kronecker-factored statistics and preconditioning for a stack of same-shape blocks.

Blocks of one parameter group that share a shape are stacked into a :class:`KroneckerBucket`,
so each step issues one batched matrix product per tensor dimension instead of one per
block. For an order-k block ``G`` the statistic of dimension ``d`` accumulates the mode-d
unfolding ``G_(d) G_(d)^T``; the preconditioned direction multiplies each mode by its
factor's inverse root ``S_d^(-1/(2k))`` (``L^(-1/4) G R^(-1/4)`` for a matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.optim.shampoo.blocking import Block


def unfold(stacked: Tensor, dim: int) -> Tensor:
    """Mode-``dim`` unfolding of a ``(B, n_1, ..., n_k)`` stack: ``(B, n_dim, prod(others))``."""
    moved = stacked.movedim(dim + 1, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def accumulate_statistics(
    factors: list[Tensor], grads: Tensor, beta2: float, matmul_dtype: torch.dtype | None = None
) -> None:
    """``S_d <- beta2 S_d + (1 - beta2) G_(d) G_(d)^T`` (a plain sum when ``beta2 == 1``).

    The products run in ``matmul_dtype`` (default: the statistics' dtype); the
    statistics accumulate in their own dtype either way.
    """
    dtype = matmul_dtype or factors[0].dtype
    grads = grads.to(dtype)
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for dim, factor in enumerate(factors):
        unfolded = unfold(grads, dim)
        if dtype == factor.dtype:
            factor.baddbmm_(unfolded, unfolded.mT, beta=beta2, alpha=weight)
        else:
            product = torch.bmm(unfolded, unfolded.mT)
            if beta2 != 1.0:
                factor.mul_(beta2)
            factor.add_(product, alpha=weight)


def precondition(
    roots: list[Tensor], stacked: Tensor, matmul_dtype: torch.dtype | None = None
) -> Tensor:
    """Multiply every mode of each block by its root: ``stacked x_1 R_1 x_2 R_2 ... x_k R_k``.

    Each pass contracts the leading block dimension with its (symmetric) root as
    ``X_(1)^T R``, which leaves that dimension last in a contiguous result; after k passes
    the dimensions are back in order, and no pass copies its input. The products run in
    ``matmul_dtype`` (default: the roots' dtype).
    """
    dtype = matmul_dtype or roots[0].dtype
    result = stacked.to(dtype)
    batch, shape = result.shape[0], result.shape[1:]
    for root in roots:
        result = torch.bmm(result.reshape(batch, root.shape[-1], -1).mT, root.to(dtype))
    return result.reshape(batch, *shape).to(stacked.dtype)


# Largest bucket on the CPU, in elements of its stacked blocks (4 MiB of float32). There a
# batched product of big blocks is no faster than a loop, while bucket-sized temporaries that
# outgrow the caches add memory traffic (benchmarks/shampoo_step.py measures both). Small
# blocks are still batched by the hundreds. On other devices, where every product is a
# kernel launch, a bucket holds every block of its shape.
MAX_BUCKET_NUMEL = 2**20


def split_bucket(
    members: list[BucketMember], block_numel: int, device: torch.device
) -> list[list[BucketMember]]:
    """Same-shape blocks in consecutive buckets (on the CPU of at most ``MAX_BUCKET_NUMEL`` elements)."""
    if device.type != "cpu":
        return [members]
    per_bucket = max(1, MAX_BUCKET_NUMEL // block_numel)
    return [members[start : start + per_bucket] for start in range(0, len(members), per_bucket)]


@dataclass(frozen=True)
class BucketMember:
    """Where a bucket's slot ``i`` comes from: parameter ``param_index`` of the group, its block."""

    param_index: int
    block_index: int
    block: Block


class KroneckerBucket:
    """Kronecker factors of a stack of same-shape blocks: statistics, roots, snapshots, root health.

    Every buffer has the member (slot) index as its leading dimension; :meth:`member_state`
    returns per-member views, which the optimizer exposes as per-parameter state. The
    blocks' momentum and grafting state live in the partition's flat buffers, at
    ``offset`` (see :mod:`.layout`).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        members: list[BucketMember],
        *,
        offset: int,
        device: torch.device,
        factor_dtype: torch.dtype,
        epsilon: float,
        keep_snapshot: bool,
    ) -> None:
        self.shape = shape
        self.members = members
        self.offset = offset
        count = len(members)
        order = len(shape)
        self.exponent = 2 * order
        self.factors = [
            epsilon * torch.eye(n, dtype=factor_dtype, device=device).repeat(count, 1, 1)
            for n in shape
        ]
        self.roots = [
            torch.eye(n, dtype=factor_dtype, device=device).repeat(count, 1, 1) for n in shape
        ]
        self.snapshots: list[Tensor] = []
        if keep_snapshot:
            self.ensure_snapshots()
        self._cast_roots: list[Tensor] = []
        self._cast_roots_key: tuple = ()
        # Root health lives on the CPU: read only when roots are installed.
        self.residuals = torch.zeros(count, order, dtype=torch.float64)
        self.consecutive_failures = torch.zeros(count, order, dtype=torch.int64)
        self.total_failures = torch.zeros(count, order, dtype=torch.int64)
        # Per dimension: chunks of slots whose roots one rank computes together, and that rank.
        self.root_chunks: list[list[tuple[range, int]]] = [[] for _ in shape]

    def ensure_snapshots(self) -> bool:
        """Allocate the snapshot buffers if missing; True when they were."""
        if self.snapshots:
            return False
        self.snapshots = [f.clone() for f in self.factors]
        return True

    def roots_in(self, dtype: torch.dtype) -> list[Tensor]:
        """The roots in ``dtype``, for products in another precision (e.g. bfloat16).

        The cast copies are persistent buffers (a captured CUDA graph reads them), rewritten
        in place when a root has changed: every in-place write (an install, a broadcast, a
        loaded state) bumps the root tensor's version counter, which is the key.
        """
        if dtype == self.roots[0].dtype:
            return self.roots
        key = (dtype, *(root._version for root in self.roots))
        if key != self._cast_roots_key:
            if not self._cast_roots or self._cast_roots[0].dtype != dtype:
                self._cast_roots = [torch.empty_like(root, dtype=dtype) for root in self.roots]
            for cast, root in zip(self._cast_roots, self.roots):
                cast.copy_(root)
            self._cast_roots_key = key
        return self._cast_roots

    def owner(self, dim: int, slot: int) -> int:
        """The rank computing the root of factor ``dim`` of slot ``slot``."""
        return next(owner for slots, owner in self.root_chunks[dim] if slot in slots)

    def member_state(self, slot: int) -> dict[str, Tensor]:
        """Views of slot ``slot``'s buffers, keyed as in the optimizer's per-parameter state."""
        prefix = f"block_{self.members[slot].block_index}."
        views = {}
        for dim in range(len(self.shape)):
            views[f"{prefix}factor_{dim}"] = self.factors[dim][slot]
            views[f"{prefix}root_{dim}"] = self.roots[dim][slot]
            if self.snapshots:
                views[f"{prefix}snapshot_{dim}"] = self.snapshots[dim][slot]
        views[prefix + "root_residual"] = self.residuals[slot]
        views[prefix + "root_consecutive_failures"] = self.consecutive_failures[slot]
        views[prefix + "root_total_failures"] = self.total_failures[slot]
        return views
