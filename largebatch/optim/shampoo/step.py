"""One Shampoo step of a partition, batched over its blocks.

Every unit's element-wise work (momentum, the grafting state and update, weight decay) is a
handful of list operations over the contiguous segments of the partition's flat buffers;
every bucket's statistics and preconditioning is one batched product per tensor dimension;
the per-block norms of the grafting rescale are one list norm for all blocks. The step is
cut in two around the inverse-root update, which needs this step's statistics and feeds its
preconditioning: :func:`prepare` (momentum, grafting, statistics), then :func:`apply`
(preconditioning and the parameter update). :func:`gather` copies the gradients in first.
Every intermediate result lives in the partition's flat scratch buffers, except the
preconditioned directions (one bucket at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.shampoo.blocking import ParamBlocking
from largebatch.optim.shampoo.grafting import GraftingRule
from largebatch.optim.shampoo.layout import ActiveSet, Partition
from largebatch.optim.shampoo.preconditioner import accumulate_statistics, precondition
from largebatch.optim.shampoo.scalars import StepScalars, lerp_


@dataclass(frozen=True)
class StepSettings:
    """The hyperparameters a step's control flow depends on (a CUDA graph is captured per value)."""

    momentum: bool
    nesterov: bool
    beta2: float
    maximize: bool
    weight_decay: bool
    matmul_dtype: torch.dtype | None
    grafting: Any  # the group's grafting config (frozen, comparable)

    @classmethod
    def of(cls, group: dict[str, Any]) -> StepSettings:
        return cls(
            momentum=group["betas"][0] != 0.0,
            nesterov=group["nesterov"],
            beta2=group["betas"][1],
            maximize=group["maximize"],
            weight_decay=group["weight_decay"] != 0.0,
            matmul_dtype=group["matmul_dtype"],
            grafting=group["grafting"],
        )


@dataclass
class Directions:
    """A prepared step: the partition's flat buffers holding the inputs to precondition and the grafted updates."""

    inputs: Tensor
    grafted: Tensor


def foreach_pairs(
    operation: Callable[[list[Tensor], list[Tensor]], None],
    targets: Sequence[Tensor],
    sources: Sequence[Tensor],
) -> None:
    """``operation(targets, sources)`` in two calls: contiguous pairs, then the others.

    On CUDA a list operation uses its multi-tensor kernel only when every pair is dense
    with the same strides; one strided block would send the whole list to a per-tensor loop.
    """
    dense = [t.is_contiguous() and s.is_contiguous() for t, s in zip(targets, sources)]
    for keep in (True, False):
        pairs = [(t, s) for t, s, d in zip(targets, sources, dense) if d == keep]
        if pairs:
            operation([t for t, _ in pairs], [s for _, s in pairs])


def gather(
    partition: Partition,
    active: ActiveSet,
    params: Sequence[Tensor],
    blockings: Sequence[ParamBlocking],
) -> None:
    """Copy the active parameters' gradients into the partition's gradient buffer."""
    targets, sources = [], []
    for param in active.params:
        grad = params[param].grad
        blocking = blockings[param]
        if not blocking.preconditioned:
            targets.append(partition.view(partition.grads, partition.param_units[param][0]))
            sources.append(grad)
            continue
        merged = grad.reshape(blocking.merged_shape)
        for group, offset in partition.transfers[param]:
            targets.append(partition.group_view(partition.grads, group, offset))
            sources.append(group.view(merged))
    foreach_pairs(torch._foreach_copy_, targets, sources)


def prepare(
    partition: Partition,
    active: ActiveSet,
    settings: StepSettings,
    grafting: GraftingRule,
    scalars: StepScalars,
) -> Directions:
    """Momentum, the grafting state and update, and the statistics ``S_d += G_(d) G_(d)^T``."""
    grads = active.views(partition.grads)
    if settings.maximize:
        torch._foreach_neg_(grads)
    inputs = partition.grads
    if settings.momentum:
        momenta = active.views(partition.momentum)
        lerp_(momenta, grads, scalars.momentum_weight)
        inputs = partition.momentum
        if settings.nesterov:
            inputs = partition.lookahead
            for g, m, x in zip(grads, momenta, active.views(inputs)):
                torch.lerp(g, m, scalars.nesterov_weight, out=x)
    states = {key: active.views(flat) for key, flat in partition.graft_state.items()}
    grafting.accumulate(states, grads)
    grafting.direction(
        active.views(inputs),
        states,
        active.views(partition.grafted),
        scalars.graft_scale,
        scalars.graft_epsilon,
        lambda: active.unit_views(partition.grafted),
    )
    for run in active.runs:
        bucket = partition.buckets[run.bucket]
        accumulate_statistics(
            [factor[run.start : run.stop] for factor in bucket.factors],
            active.run_view(partition.grads, run),
            settings.beta2,
            settings.matmul_dtype,
        )
    return Directions(inputs, partition.grafted)


def grafting_ratios(directions: list[Tensor], grafted: list[Tensor]) -> Tensor:
    """``-||D_b|| / ||P_b||`` per block: the factor that gives Shampoo's direction the grafted norm.

    The grafted updates ``D_b`` carry ``-lr`` already, hence the sign.
    """
    norms = torch.stack(torch._foreach_norm(directions))
    targets = torch.stack(torch._foreach_norm(grafted))
    return targets.div_(norms.clamp_min_(torch.finfo(norms.dtype).tiny)).neg_()


def apply(
    partition: Partition,
    active: ActiveSet,
    params: Sequence[Tensor],
    blockings: Sequence[ParamBlocking],
    directions: Directions,
    settings: StepSettings,
    scalars: StepScalars,
    preconditioned: frozenset[int],
) -> None:
    """Precondition the blocks of the parameters in ``preconditioned``; update every active parameter.

    A parameter's update is Shampoo's direction rescaled to the grafted norm, block by
    block, or the grafted update itself (warm-up, unblocked parameters); the rescaled
    directions overwrite their blocks' grafted updates in the flat buffer, from which
    every parameter is updated. Decoupled weight decay comes first.
    """
    updates = directions.grafted
    runs = [
        run
        for run in active.runs
        if any(active.units[index].param in preconditioned for index in run.units)
    ]
    if runs:
        stacked = []
        for run in runs:
            bucket = partition.buckets[run.bucket]
            dtype = settings.matmul_dtype or bucket.roots[0].dtype
            roots = [root[run.start : run.stop] for root in bucket.roots_in(dtype)]
            stacked.append(
                precondition(roots, active.run_view(directions.inputs, run), settings.matmul_dtype)
            )
        grafted = active.unit_views(updates)
        ratios = grafting_ratios(
            [block for run_blocks in stacked for block in run_blocks.unbind(0)],
            [grafted[index] for run in runs for index in run.units],
        )
        start = 0
        for run, run_blocks in zip(runs, stacked):
            count = run.stop - run.start
            ratio = ratios[start : start + count].view(-1, *[1] * (run_blocks.dim() - 1))
            start += count
            rows = [
                row
                for row, index in enumerate(run.units)
                if active.units[index].param in preconditioned
            ]
            if len(rows) == count:
                torch.mul(run_blocks, ratio, out=active.run_view(updates, run))
            else:  # some rows still warm up (their parameters joined later)
                run_blocks.mul_(ratio)
                torch._foreach_copy_(
                    [grafted[run.first + row] for row in rows], [run_blocks[row] for row in rows]
                )

    targets, sources = [], []
    for param in active.params:
        tensor = params[param]
        blocking = blockings[param]
        if not blocking.preconditioned:
            targets.append(tensor)
            sources.append(partition.view(updates, partition.param_units[param][0]))
        elif tensor.is_contiguous():
            merged = tensor.view(blocking.merged_shape)
            for group, offset in partition.transfers[param]:
                targets.append(group.view(merged))
                sources.append(partition.group_view(updates, group, offset))
        else:  # e.g. channels_last: no merged view; assemble the update first
            merged = torch.empty(blocking.merged_shape, dtype=tensor.dtype, device=tensor.device)
            for group, offset in partition.transfers[param]:
                group.view(merged).copy_(partition.group_view(updates, group, offset))
            targets.append(tensor)
            sources.append(merged.view(tensor.shape))
    if settings.weight_decay:
        torch._foreach_mul_([params[param] for param in active.params], scalars.decay)
    foreach_pairs(torch._foreach_add_, targets, sources)
