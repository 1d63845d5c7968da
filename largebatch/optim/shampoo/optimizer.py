"""Shampoo (Anil et al. 2021, "Scalable Second Order Optimization for Deep Learning").

Per block ``G`` (see :mod:`.blocking`), one statistic per tensor dimension accumulates the
mode unfoldings ``G_(d) G_(d)^T`` (a sum, or an EMA with ``beta2 < 1``) from ``epsilon * I``.
The step direction multiplies the momentum by each statistic's inverse root
``S_d^(-1/(2k))`` for an order-k block (``L^(-1/4) M R^(-1/4)`` for a matrix) and takes its
per-block norm from a grafted optimizer (Adam by default). Inverse roots are recomputed
every ``precondition_frequency`` steps from a snapshot, on a background thread, and
installed exactly ``staleness`` steps later; under ``torch.distributed`` each rank computes
only the roots of the blocks it owns and broadcasts them.

Hyperparameters live in ``param_groups``. Structural ones (``max_preconditioner_dim``,
``max_preconditioned_dim``, ``factor_dtype``, ``grafting``) are read when the group is
added; the others may change during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.shampoo.blocking import ParamBlocking, plan_blocking
from largebatch.optim.shampoo.config import (
    DistributedConfig,
    GraftingConfig,
    RootConfig,
    grafting_config,
    require,
    root_config,
)
from largebatch.optim.shampoo.distributed import (
    Topology,
    balanced_owners,
    broadcast_from_owners,
    root_chunks,
    root_cost,
)
from largebatch.optim.shampoo.grafting import GraftingRule, make_grafting
from largebatch.optim.shampoo.matrix_roots import RootResult, inverse_roots
from largebatch.optim.shampoo.preconditioner import (
    BucketMember,
    KroneckerBucket,
    accumulate_statistics,
    precondition,
    split_bucket,
)
from largebatch.optim.shampoo.root_worker import RootWorker

_NO_STEP = -1  # "no roots yet" / "no job pending" in the group's step-valued state
_GROUP_KEYS = ("step", "roots_step", "pending_roots_step")  # in the group's first parameter's state


MATMUL_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16)
"""Allowed ``matmul_dtype`` values (float16 is left out: ``G G^T`` overflows its range)."""


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


@dataclass
class _GroupLayout:
    """A parameter group's blocking, buckets, and where each parameter's blocks sit."""

    blockings: list[ParamBlocking]
    buckets: list[KroneckerBucket]
    placements: list[list[tuple[int, int]]]  # per parameter, per block: (bucket, slot)
    grafting: GraftingRule


@dataclass
class _ActiveBucket:
    """The slots of a bucket whose parameters have a gradient this step, with their tensors.

    When only some slots are active (``rows`` is set) the tensors are gathered copies,
    written back by :meth:`write_back`; otherwise they are the bucket's own buffers.
    """

    index: int  # position in the group's buckets
    bucket: KroneckerBucket
    slots: list[int]
    rows: Tensor | None
    grads: Tensor
    factors: list[Tensor]
    momentum: Tensor
    graft_state: dict[str, Tensor]

    @classmethod
    def gather(
        cls, index: int, bucket: KroneckerBucket, slots: list[int], grad_blocks: list[Tensor]
    ) -> _ActiveBucket:
        grads = grad_blocks[0].unsqueeze(0) if len(grad_blocks) == 1 else torch.stack(grad_blocks)
        if len(slots) == len(bucket.members):
            return cls(
                index,
                bucket,
                slots,
                None,
                grads,
                bucket.factors,
                bucket.momentum,
                bucket.graft_state,
            )
        rows = torch.tensor(slots, device=bucket.momentum.device)
        return cls(
            index,
            bucket,
            slots,
            rows,
            grads,
            [f.index_select(0, rows) for f in bucket.factors],
            bucket.momentum.index_select(0, rows),
            {k: v.index_select(0, rows) for k, v in bucket.graft_state.items()},
        )

    def write_back(self) -> None:
        if self.rows is None:
            return
        for full, part in zip(self.bucket.factors, self.factors):
            full.index_copy_(0, self.rows, part)
        self.bucket.momentum.index_copy_(0, self.rows, self.momentum)
        for key, part in self.graft_state.items():
            self.bucket.graft_state[key].index_copy_(0, self.rows, part)

    def roots(self, dtype: torch.dtype) -> list[Tensor]:
        roots = self.bucket.roots_in(dtype)
        if self.rows is None:
            return roots
        return [r.index_select(0, self.rows) for r in roots]


# (bucket index, dim, slots, result) for every root chunk a rank computed
_RootBatchResult = tuple[int, int, range, RootResult]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype(value: Any) -> Any:
    """A dtype given by name (``"bfloat16"``, e.g. from the command line) as ``torch.bfloat16``."""
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return value


def _compute_roots(
    batches: list[tuple[int, int, range, Tensor]], exponents: list[int], config: RootConfig
) -> list[_RootBatchResult]:
    """The inverse roots of a rank's chunks (run on the root thread or in the step)."""
    return [
        (bucket, dim, slots, inverse_roots(matrices, exponents[bucket], config))
        for bucket, dim, slots, matrices in batches
    ]


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo with grafting, momentum, decoupled weight decay and stale async roots.

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives failures names).
        lr: learning rate (applied to the grafted step size).
        betas: ``(beta1, beta2)``: momentum EMA of the gradient, and the statistics EMA
            (``beta2 = 1`` sums them, as AdaGrad does).
        epsilon: statistics start at ``epsilon * I``.
        weight_decay: decoupled weight decay (``p <- p - lr * weight_decay * p``).
        nesterov: precondition ``beta1 * M + (1 - beta1) * G`` instead of ``M``.
        max_preconditioner_dim: block size: merged dimensions above it are split.
        max_preconditioned_dim: parameters with a dimension above it (embeddings, output
            layers) get the grafted diagonal step only, as do 1-D parameters.
        precondition_frequency: inverse roots are recomputed every this many steps.
        start_preconditioning_step: before it, the grafted step alone (default: the first
            step with computed roots, ``precondition_frequency + staleness``).
        staleness: roots computed from the statistics of step ``t0`` are used from step
            ``t0 + staleness``; 0 computes them in the step itself. Default:
            ``max(1, precondition_frequency // 4)`` when asynchronous, else 0.
        grafting: a grafting config or name: ``"adam"`` (default), ``"adagrad"``,
            ``"rmsprop"``, ``"sgd"``.
        roots: a :class:`RootConfig` or method name: ``"eigh"`` (default), ``"coupled_newton"``.
        factor_dtype: dtype of statistics and roots (float32 or float64; a dtype or its
            name).
        matmul_dtype: dtype (or its name) of the per-step matrix products (statistics and
            preconditioning): ``None`` uses ``factor_dtype``; ``torch.bfloat16`` rounds
            their operands (and results) to bfloat16, several times faster on hardware
            with bfloat16 matrix units (AMX, tensor cores), while the statistics still
            accumulate and the roots are still computed in ``factor_dtype``.
        asynchronous: compute roots on a background thread (needs ``staleness >= 1``);
            the result is identical to the synchronous computation.
        distributed: share root computations across data-parallel ranks; by default across
            the default process group when ``torch.distributed`` is initialised
            (``DistributedConfig(enabled=False)`` opts out).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        max_preconditioner_dim: int = 1024,
        max_preconditioned_dim: int = 8192,
        precondition_frequency: int = 100,
        start_preconditioning_step: int | None = None,
        staleness: int | None = None,
        grafting: GraftingConfig | str = "adam",
        roots: RootConfig | str = "eigh",
        factor_dtype: torch.dtype = torch.float32,
        matmul_dtype: torch.dtype | None = None,
        asynchronous: bool = True,
        distributed: DistributedConfig | None = None,
    ) -> None:
        require(isinstance(asynchronous, bool), f"Invalid asynchronous: {asynchronous!r}")
        self.asynchronous = asynchronous
        self._topology = Topology.resolve(distributed)
        self._rank_loads = [0.0] * self._topology.world_size
        self._layouts: list[_GroupLayout] = []
        self._worker = RootWorker()
        self._factors_computed = 0
        defaults = dict(
            lr=lr,
            betas=betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            nesterov=nesterov,
            max_preconditioner_dim=max_preconditioner_dim,
            max_preconditioned_dim=max_preconditioned_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            staleness=staleness,
            grafting=grafting,
            roots=roots,
            factor_dtype=factor_dtype,
            matmul_dtype=matmul_dtype,
        )
        self._resolve(dict(defaults))  # fail on bad defaults even before a group exists
        super().__init__(params, defaults)

    # --- configuration -------------------------------------------------------------

    def _resolve(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Validate a group's hyperparameters; fill the defaults that depend on others."""
        lr = settings["lr"]
        require(isinstance(lr, (int, float)) and lr >= 0.0, f"Invalid learning rate: {lr}")
        betas = settings["betas"]
        require(len(betas) == 2, f"Invalid betas: {betas}")
        require(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        require(0.0 < betas[1] <= 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        require(settings["epsilon"] > 0.0, f"Invalid epsilon: {settings['epsilon']}")
        require(
            settings["weight_decay"] >= 0.0, f"Invalid weight_decay: {settings['weight_decay']}"
        )
        require(
            isinstance(settings["nesterov"], bool), f"Invalid nesterov: {settings['nesterov']!r}"
        )
        for key in ("max_preconditioner_dim", "max_preconditioned_dim", "precondition_frequency"):
            value = settings[key]
            require(_is_int(value) and value >= 1, f"Invalid {key}: {value}")
        frequency = settings["precondition_frequency"]
        staleness = settings["staleness"]
        if staleness is None:
            staleness = max(1, frequency // 4) if self.asynchronous else 0
        require(
            _is_int(staleness) and 0 <= staleness <= frequency,
            f"Invalid staleness: {staleness} (must be in [0, precondition_frequency={frequency}])",
        )
        require(
            staleness >= 1 or not self.asynchronous,
            f"Invalid staleness: {staleness} (asynchronous roots need staleness >= 1)",
        )
        start = settings["start_preconditioning_step"]
        if start is None:
            start = frequency + staleness
        require(_is_int(start) and start >= 1, f"Invalid start_preconditioning_step: {start}")
        factor_dtype = _dtype(settings["factor_dtype"])
        require(
            factor_dtype in (torch.float32, torch.float64),
            f"Invalid factor_dtype: {settings['factor_dtype']}",
        )
        matmul_dtype = _dtype(settings["matmul_dtype"])
        require(
            matmul_dtype in MATMUL_DTYPES,
            f"Invalid matmul_dtype: {settings['matmul_dtype']} (expected one of {MATMUL_DTYPES})",
        )
        return {
            **settings,
            "factor_dtype": factor_dtype,
            "matmul_dtype": matmul_dtype,
            "staleness": staleness,
            "start_preconditioning_step": start,
            "grafting": grafting_config(settings["grafting"]),
            "roots": root_config(settings["roots"]),
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's settings, then block its parameters and allocate their state."""
        settings = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        resolved = {k: v for k, v in self._resolve(settings).items() if k in self.defaults}
        super().add_param_group({**param_group, **resolved})
        if not self.param_groups[-1]["params"]:
            self.param_groups.pop()
            raise ValueError("Invalid parameter group: it has no parameters")
        self._layouts.append(self._build_layout(len(self.param_groups) - 1, self.param_groups[-1]))

    def _build_layout(self, group_index: int, group: dict[str, Any]) -> _GroupLayout:
        params: list[Tensor] = group["params"]
        names = group.get("param_names") or [
            f"param_groups[{group_index}].params[{i}] {list(p.shape)}" for i, p in enumerate(params)
        ]
        blockings = [
            plan_blocking(
                name,
                tuple(p.shape),
                group["max_preconditioner_dim"],
                group["max_preconditioned_dim"],
            )
            for name, p in zip(names, params)
        ]
        grafting = make_grafting(group["grafting"])

        members: dict[tuple, list[BucketMember]] = {}
        for param_index, (param, blocking) in enumerate(zip(params, blockings)):
            for block_index, block in enumerate(blocking.blocks):
                key = (block.shape, param.device, param.dtype)
                members.setdefault(key, []).append(BucketMember(param_index, block_index, block))
        buckets = [
            KroneckerBucket(
                shape,
                bucket_members,
                device=device,
                param_dtype=dtype,
                factor_dtype=group["factor_dtype"],
                epsilon=group["epsilon"],
                graft_keys=grafting.state_keys,
                keep_snapshot=group["staleness"] > 0,
            )
            for (shape, device, dtype), same_shape in members.items()
            for bucket_members in split_bucket(same_shape, math.prod(shape))
        ]
        placements: list[list[tuple[int, int]]] = [[(0, 0)] * len(b.blocks) for b in blockings]
        for bucket_index, bucket in enumerate(buckets):
            for slot, member in enumerate(bucket.members):
                placements[member.param_index][member.block_index] = (bucket_index, slot)
        self._assign_owners(buckets)

        for param_index, param in enumerate(params):
            state = self.state[param]
            for bucket_index, slot in placements[param_index]:
                state.update(buckets[bucket_index].member_state(slot))
            if not blockings[param_index].preconditioned:
                state["momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                for key in grafting.state_keys:
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        first = self.state[params[0]]
        first["step"] = torch.tensor(0, dtype=torch.int64)
        first["roots_step"] = torch.tensor(_NO_STEP, dtype=torch.int64)
        first["pending_roots_step"] = torch.tensor(_NO_STEP, dtype=torch.int64)
        return _GroupLayout(blockings, buckets, placements, grafting)

    def _assign_owners(self, buckets: list[KroneckerBucket]) -> None:
        """Cut each bucket's factors into root chunks and give each chunk a rank, balancing cost."""
        chunks = [
            (bucket, dim, slots)
            for bucket in buckets
            for dim, size in enumerate(bucket.shape)
            for slots in root_chunks(len(bucket.members), size)
        ]
        costs = [len(slots) * root_cost(bucket.shape[dim]) for bucket, dim, slots in chunks]
        for (bucket, dim, slots), owner in zip(chunks, balanced_owners(costs, self._rank_loads)):
            bucket.root_chunks[dim].append((slots, owner))

    # --- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            self._step_group(group_index, group)
        return loss

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        layout = self._layouts[group_index]
        params: list[Tensor] = group["params"]
        has_grad = [p.grad is not None for p in params]
        if not any(has_grad):
            return
        step_count = self.state[params[0]]["step"]
        step_count += 1
        step = int(step_count)  # a CPU tensor: no device synchronisation
        beta1, beta2 = group["betas"]

        # Units of the element-wise math: unblocked parameters, then active buckets.
        diagonal = [
            i for i, b in enumerate(layout.blockings) if has_grad[i] and not b.preconditioned
        ]
        active = self._active_buckets(layout, params, has_grad)
        grads = [params[i].grad for i in diagonal] + [a.grads for a in active]
        momenta = [self.state[params[i]]["momentum"] for i in diagonal] + [
            a.momentum for a in active
        ]
        graft_state = {
            key: [self.state[params[i]][key] for i in diagonal]
            + [a.graft_state[key] for a in active]
            for key in layout.grafting.state_keys
        }

        # inputs * input_scale is the bias-corrected momentum (Nesterov: its look-ahead).
        # Shampoo's direction is rescaled per block anyway, so only the grafted step needs
        # the scale, which it folds into its last pass.
        if beta1 == 0.0:
            inputs, input_scale = grads, 1.0
        else:
            torch._foreach_lerp_(momenta, grads, 1.0 - beta1)
            if group["nesterov"]:
                inputs = torch._foreach_lerp(grads, momenta, beta1)
                input_scale = 1.0 / (1.0 - beta1 ** (step + 1))
            else:
                inputs, input_scale = momenta, 1.0 / (1.0 - beta1**step)
        layout.grafting.accumulate(graft_state, grads)
        grafted = layout.grafting.direction(inputs, input_scale, graft_state, step)
        for unit in active:
            accumulate_statistics(unit.factors, unit.grads, beta2, group["matmul_dtype"])
            unit.write_back()

        self._update_roots(group_index, group, layout, step)

        offset = len(diagonal)
        block_updates: dict[tuple[int, int], Tensor] = {}
        for position, unit in enumerate(active):
            x, d = inputs[offset + position], grafted[offset + position]
            update = (
                self._grafted_direction(unit, x, d, group["matmul_dtype"])
                if step >= group["start_preconditioning_step"]
                else d
            )
            for row, slot in enumerate(unit.slots):
                block_updates[unit.index, slot] = update[row]
        diagonal_params = [params[i] for i in diagonal]
        self._apply_updates(
            group, layout, has_grad, diagonal_params, grafted[:offset], block_updates
        )

    @staticmethod
    def _active_buckets(
        layout: _GroupLayout, params: list[Tensor], has_grad: list[bool]
    ) -> list[_ActiveBucket]:
        """Each bucket with a gradient this step, its gradient blocks stacked."""
        grad_blocks = {
            i: blocking.block_views(params[i].grad)
            for i, blocking in enumerate(layout.blockings)
            if has_grad[i] and blocking.preconditioned
        }
        active = []
        for index, bucket in enumerate(layout.buckets):
            slots = [s for s, m in enumerate(bucket.members) if has_grad[m.param_index]]
            if slots:
                members = [bucket.members[s] for s in slots]
                blocks = [grad_blocks[m.param_index][m.block_index] for m in members]
                active.append(_ActiveBucket.gather(index, bucket, slots, blocks))
        return active

    def _apply_updates(
        self,
        group: dict[str, Any],
        layout: _GroupLayout,
        has_grad: list[bool],
        diagonal_targets: list[Tensor],
        diagonal_updates: list[Tensor],
        block_updates: dict[tuple[int, int], Tensor],
    ) -> None:
        """Decoupled weight decay, then ``p -= lr * update``.

        Block updates go straight into the parameter's block views; a non-contiguous
        parameter (e.g. channels_last) gets its blocks assembled into one update first.
        """
        params = group["params"]
        targets, updates = list(diagonal_targets), list(diagonal_updates)
        for i, blocking in enumerate(layout.blockings):
            if has_grad[i] and blocking.preconditioned:
                pieces = [block_updates[placement] for placement in layout.placements[i]]
                if params[i].is_contiguous():
                    targets += blocking.block_views(params[i])
                    updates += pieces
                else:
                    targets.append(params[i])
                    updates.append(self._assemble(params[i], blocking, pieces))
        if group["weight_decay"] != 0.0:
            decayed = [p for p, g in zip(params, has_grad) if g]
            torch._foreach_mul_(decayed, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(targets, updates, alpha=-group["lr"])

    @staticmethod
    def _grafted_direction(
        unit: _ActiveBucket, x: Tensor, grafted: Tensor, matmul_dtype: torch.dtype | None
    ) -> Tensor:
        """Shampoo's direction for each block, rescaled to the grafted step's norm."""
        roots = unit.roots(matmul_dtype or unit.bucket.roots[0].dtype)
        direction = precondition(roots, x, matmul_dtype)
        block_dims = tuple(range(1, direction.dim()))
        norms = torch.linalg.vector_norm(direction, dim=block_dims, keepdim=True)
        target = torch.linalg.vector_norm(grafted, dim=block_dims, keepdim=True)
        return direction.mul_(target / norms.clamp_min(torch.finfo(norms.dtype).tiny))

    @staticmethod
    def _assemble(param: Tensor, blocking: ParamBlocking, pieces: list[Tensor]) -> Tensor:
        """A parameter-shaped update from its blocks' updates."""
        full = torch.empty(blocking.merged_shape, dtype=param.dtype, device=param.device)
        for block, piece in zip(blocking.blocks, pieces):
            full[block.slices] = piece
        return full.view(param.shape)

    # --- inverse roots ---------------------------------------------------------------

    def _update_roots(
        self, group_index: int, group: dict[str, Any], layout: _GroupLayout, step: int
    ) -> None:
        """Install due roots, then start the next computation when the schedule says so."""
        if not layout.buckets:
            return
        state = self.state[group["params"][0]]
        staleness = group["staleness"]
        pending = int(state["pending_roots_step"])
        if pending != _NO_STEP:
            if self.asynchronous and not self._worker.has_job(group_index):
                self._submit(group_index, group, layout)  # e.g. resumed from a state_dict
            # Due after `staleness` steps, and at the latest when the next computation starts
            # (staleness may have been raised since): one computation in flight per group.
            if step >= pending + staleness or step % group["precondition_frequency"] == 0:
                results = (
                    self._worker.result(group_index)
                    if self.asynchronous
                    else _compute_roots(*self._root_batches(group, layout, snapshot=True))
                )
                self._install(group, layout, results, pending)
                state["pending_roots_step"].fill_(_NO_STEP)
        if step % group["precondition_frequency"] == 0:
            if staleness == 0:
                self._install(
                    group,
                    layout,
                    _compute_roots(*self._root_batches(group, layout, snapshot=False)),
                    step,
                )
                return
            self._ensure_snapshots(layout, group)
            for bucket in layout.buckets:
                for snapshot, factor in zip(bucket.snapshots, bucket.factors):
                    snapshot.copy_(factor)
            state["pending_roots_step"].fill_(step)
            if self.asynchronous:
                self._submit(group_index, group, layout)

    def _root_batches(
        self, group: dict[str, Any], layout: _GroupLayout, snapshot: bool
    ) -> tuple[list[tuple[int, int, range, Tensor]], list[int], RootConfig]:
        """This rank's root chunks: views of the statistics or of their snapshot."""
        batches = []
        for bucket_index, bucket in enumerate(layout.buckets):
            sources = bucket.snapshots if snapshot else bucket.factors
            for dim, source in enumerate(sources):
                for slots, owner in bucket.root_chunks[dim]:
                    if owner == self._topology.rank:
                        batches.append((bucket_index, dim, slots, source[slots.start : slots.stop]))
        return batches, [b.exponent for b in layout.buckets], group["roots"]

    def _submit(self, group_index: int, group: dict[str, Any], layout: _GroupLayout) -> None:
        batches, exponents, config = self._root_batches(group, layout, snapshot=True)
        device = layout.buckets[0].momentum.device
        self._worker.submit(group_index, lambda: _compute_roots(batches, exponents, config), device)

    def _ensure_snapshots(self, layout: _GroupLayout, group: dict[str, Any]) -> None:
        """Allocate snapshot buffers (staleness raised after construction, or a loaded state)."""
        for bucket in layout.buckets:
            if not bucket.snapshots:
                bucket.snapshots = [f.clone() for f in bucket.factors]
                for slot, member in enumerate(bucket.members):
                    self.state[group["params"][member.param_index]].update(
                        bucket.member_state(slot)
                    )

    def _install(
        self,
        group: dict[str, Any],
        layout: _GroupLayout,
        results: list[_RootBatchResult],
        source_step: int,
    ) -> None:
        """Adopt each successful root, keep the previous one on failure, share across ranks."""
        for bucket_index, dim, slots, result in results:
            bucket = layout.buckets[bucket_index]
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
            self._factors_computed += len(slots)
        if self._topology.world_size > 1:
            self._share(layout)
        self.state[group["params"][0]]["roots_step"].fill_(source_step)
        self._raise_on_repeated_failures(layout, group["roots"].max_consecutive_failures)

    def _share(self, layout: _GroupLayout) -> None:
        """Give every rank each owner's roots and failure counters."""
        entries = []
        for bucket in layout.buckets:
            for dim in range(len(bucket.shape)):
                for slot in range(len(bucket.members)):
                    owner = bucket.owner(dim, slot)
                    entries += [
                        (owner, bucket.roots[dim][slot]),
                        (owner, bucket.residuals[slot, dim : dim + 1]),
                        (owner, bucket.consecutive_failures[slot, dim : dim + 1]),
                        (owner, bucket.total_failures[slot, dim : dim + 1]),
                    ]
        broadcast_from_owners(entries, self._topology, layout.buckets[0].momentum.device)

    @staticmethod
    def _raise_on_repeated_failures(layout: _GroupLayout, limit: int) -> None:
        for bucket in layout.buckets:
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

    # --- what the optimizer exposes ---------------------------------------------------

    @property
    def root_failure_count(self) -> int:
        """Inverse-root computations rejected so far (their previous roots were kept)."""
        return sum(int(b.total_failures.sum()) for layout in self._layouts for b in layout.buckets)

    @property
    def factors_computed(self) -> int:
        """Inverse roots this rank has computed so far."""
        return self._factors_computed

    @property
    def root_staleness(self) -> int | None:
        """Steps since the statistics behind the oldest roots in use (None before any roots)."""
        ages = []
        for group in self.param_groups:
            state = self.state[group["params"][0]]
            if int(state["roots_step"]) != _NO_STEP:
                ages.append(int(state["step"]) - int(state["roots_step"]))
        return max(ages) if ages else None

    def root_report(self) -> list[FactorReport]:
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
            for layout in self._layouts
            for bucket in layout.buckets
            for slot, member in enumerate(bucket.members)
            for dim, size in enumerate(bucket.shape)
        ]

    # --- checkpoints -----------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by a Shampoo with the same parameters and blocking.

        Tensors are restored in their saved dtype (``torch.optim`` would cast them to the
        parameter's dtype), bucket-backed ones (statistics, roots, momentum, ...) by copying
        into this optimizer's buffers; a root computation that was pending restarts from
        its saved snapshot. A state whose blocking differs raises before anything changes.
        """
        saved_ids = iter([i for g in state_dict["param_groups"] for i in g["params"]])
        saved_states = [
            [state_dict["state"].get(next(saved_ids), {}) for _ in group["params"]]
            for group in self.param_groups
        ]
        for layout, group, saved_group in zip(self._layouts, self.param_groups, saved_states):
            if any(
                key.startswith("block_") and "snapshot" in key for s in saved_group for key in s
            ):
                self._ensure_snapshots(layout, group)
            for param_index, saved in enumerate(saved_group):
                for key, view in self._bucket_views(layout, param_index).items():
                    if key not in saved and "snapshot" in key:
                        continue
                    if key not in saved or saved[key].shape != view.shape:
                        raise ValueError(
                            f"Invalid Shampoo state_dict: {key!r} of {layout.blockings[param_index].name} "
                            f"is {tuple(saved[key].shape) if key in saved else 'missing'}, expected "
                            f"{tuple(view.shape)} (saved with a different blocking?)"
                        )

        self._worker.discard_all()
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("matmul_dtype", None)  # states saved before the option existed
        for layout, group, saved_group in zip(self._layouts, self.param_groups, saved_states):
            for param_index, (param, saved) in enumerate(zip(group["params"], saved_group)):
                views = self._bucket_views(layout, param_index)
                self.state[param] = {
                    key: views[key].copy_(value)
                    if key in views
                    else value.clone()
                    if key in _GROUP_KEYS
                    else value.to(param.device, copy=True)
                    for key, value in saved.items()
                }

    @staticmethod
    def _bucket_views(layout: _GroupLayout, param_index: int) -> dict[str, Tensor]:
        """A parameter's state tensors that are views into its buckets."""
        return {
            key: view
            for bucket_index, slot in layout.placements[param_index]
            for key, view in layout.buckets[bucket_index].member_state(slot).items()
        }
