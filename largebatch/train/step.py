"""One optimizer step as the optimizer's step protocol asks: the driver the loop and the tests share.

:class:`StepDriver` reads nothing but the optimizer's protocol
(:class:`~largebatch.optim.StepProtocol`, and for the classical methods
:class:`~largebatch.optim.classical_protocol.ClassicalStepProtocol`) and, where
the protocol says so, its ``snapshot_due`` and ``hessian_due``:

================================  ==============================================================
protocol                          what the driver does
================================  ==============================================================
standard                          gradient (``.grad``), then ``step()``
closure ``"same"``/``"fresh"``    ``step(closure)``; a call is a forward/backward on the step's
                                  batch, or on the next one
``closure_backward=False``        the closure returns the loss with its graph, on the unwrapped
                                  module (under DDP the optimizer averages what it computes)
``hessian_sample``                ``hessian_closure=`` on the Hessian sample when ``hessian_due``
``per_example``                   per-example gradients (``torch.func``) and the batch's indices
``snapshots``                     ``snapshot(closure)`` over the whole training set when
                                  ``snapshot_due`` (SVRG)
================================  ==============================================================

Each step reports its cost in **example gradients**, the unit of the review's
"effective passes over the data": ``b`` per gradient on ``b`` examples, ``n``
per full pass, :data:`HVP_COST` ``x h`` per Hessian-vector product on ``h``
examples and :data:`FORWARD_COST` ``x b`` per loss-only evaluation (a line-search
trial). On request it also computes the batch's gradient statistics for a
batch-size controller; for the norm test this pass also yields the mean
gradient, which then replaces the backward pass (the "cheap path"). Where
module hooks serve the model (:mod:`~largebatch.diagnostics.per_example_hooks`)
the pass is an ordinary forward and backward, and the inner-product test takes
the cheap path too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from largebatch.diagnostics.evaluation import all_reduce_sum
from largebatch.diagnostics.noise_scale import gradient_sqnorm
from largebatch.diagnostics.per_example import (
    GradientStatistics,
    gradient_statistics,
    per_example_gradients_and_losses,
)
from largebatch.diagnostics.per_example_hooks import unsupported_reason
from largebatch.optim import step_protocol_of
from largebatch.optim.classical_protocol import ClassicalStepProtocol, ReportsStepStatistics
from largebatch.train import distributed
from largebatch.train.data import Batch, BatchAt, BatchStream
from largebatch.utils.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
#: a loss-only forward pass, in example gradients (a backward costs about two forwards)
FORWARD_COST = 1.0 / 3.0
#: one Hessian-vector product per example, in example gradients (a double backward that
#: reuses the gradient's graph; benchmarks/hvp.py, docs/classical.md)
HVP_COST = 2.0


@dataclass(frozen=True)
class StatisticsRequest:
    """What a batch-size controller needs from a step (``gradient_statistics``'s options).

    Attributes:
        projections: the inner-product and orthogonality tests' ``S3`` (the norm
            test does without, which allows the cheap path without hooks).
        group_size: examples per sample (1: exact per-example statistics).
        chunk_size: samples per statistics pass (bounds memory).
    """

    projections: bool = False
    group_size: int = 1
    chunk_size: int = 256


@dataclass
class StepResult:
    """What one step did.

    Attributes:
        loss: this process's loss at the parameters before the step (detached).
        returned: what ``optimizer.step`` returned.
        batch: where the step's batch lies (:meth:`BatchStream.at` reads it again).
        gradient_evaluations: gradients over a global batch (a snapshot's full pass
            counts as ``ceil(n / batch)``).
        example_gradients: the step's cost in example gradients (module docstring).
        statistics: the batch's gradient statistics, if they were asked for.
    """

    loss: Tensor
    returned: Any
    batch: BatchAt | None = None
    gradient_evaluations: int = 0
    example_gradients: float = 0.0
    statistics: GradientStatistics | None = None

    def gradient(self, examples: int) -> None:
        self.gradient_evaluations += 1
        self.example_gradients += examples


def classical_protocol(optimizer: torch.optim.Optimizer) -> ClassicalStepProtocol:
    """The optimizer's protocol with the classical fields (all off for a plain protocol)."""
    protocol = step_protocol_of(optimizer)
    if isinstance(protocol, ClassicalStepProtocol):
        return protocol
    return ClassicalStepProtocol(**asdict(protocol))


def check_per_example_model(model: nn.Module, why: str) -> None:
    """``ConfigError`` if ``model`` has batch norm, which has no per-example gradients."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ConfigError(
            f"Invalid model for {why}: it has batch norm ({type(norms[0]).__name__}), whose "
            "statistics couple the examples, so there are no per-example gradients in training"
        )


def concatenate(batches: list[Batch]) -> Batch:
    """One batch from micro-batches."""
    if len(batches) == 1:
        return batches[0]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


class StepDriver:
    """Steps ``optimizer`` on batches from a :class:`BatchStream`, as its protocol asks.

    Args:
        model: the module (unwrapped): ``torch.func`` passes and the loss closures of
            ``closure_backward=False`` protocols run on it.
        optimizer: the optimizer to drive.
        loss_fn: ``(outputs, targets) -> mean loss``.
        train_model: what forward/backward passes go through (the DDP wrapper);
            default ``model``.
        autocast: context manager factory for forward passes (bfloat16 autocast).
        hessian_batch_size: the Hessian sample (global examples): the first ones of
            the step's batch if it is no larger, else an independent sample
            (:meth:`BatchStream.sample`). ``None``: the step's batch itself.
        full_pass_batch_size: examples per chunk of an SVRG snapshot's full pass
            (this process's).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        train_model: nn.Module | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        hessian_batch_size: int | None = None,
        full_pass_batch_size: int = 256,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.train_model = model if train_model is None else train_model
        self.autocast = autocast
        self.hessian_batch_size = hessian_batch_size
        self.full_pass_batch_size = full_pass_batch_size
        self.protocol = classical_protocol(optimizer)
        if self.protocol.per_example:
            check_per_example_model(model, "an optimizer that takes per-example gradients")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = [p for p in model.parameters() if p.requires_grad]
        #: the statistics come from hooks on the step's pass, projections included
        self.hooks_serve_statistics = unsupported_reason(model, trainable) is None

    def step(
        self,
        data: BatchStream,
        batch_size: int | None = None,
        *,
        statistics: StatisticsRequest | None = None,
        sqnorms: list[Tensor] | None = None,
    ) -> StepResult:
        """One update from the next global batch of ``batch_size`` examples (default: the stream's).

        ``statistics`` asks for the batch's :class:`GradientStatistics` (at the
        parameters before the step); ``sqnorms`` goes to the first gradient's
        :func:`forward_backward` (the noise-scale monitor).
        """
        protocol, optimizer = self.protocol, self.optimizer
        batch_size = data.batch_size if batch_size is None else batch_size
        snapshot = None
        if protocol.snapshots and optimizer.snapshot_due:
            snapshot = StepResult(torch.zeros(()), None)
            optimizer.snapshot(self._full_gradient_closure(data, batch_size, snapshot))
        batches = data.next(batch_size)
        where = data.last  # before a "fresh" closure draws more
        if protocol.per_example:
            result = self._per_example_step(data, batches, batch_size, statistics)
        else:
            result = self._gradient_step(data, batches, batch_size, statistics, sqnorms)
        result.batch = where
        if snapshot is not None:
            result.gradient_evaluations += snapshot.gradient_evaluations
            result.example_gradients += snapshot.example_gradients
        return result

    # --- the protocols -------------------------------------------------------------------

    def _gradient_step(
        self,
        data: BatchStream,
        batches: list[Batch],
        batch_size: int,
        statistics: StatisticsRequest | None,
        sqnorms: list[Tensor] | None,
    ) -> StepResult:
        protocol, optimizer = self.protocol, self.optimizer
        result = StepResult(torch.zeros(()), None)
        local = protocol.local_first_gradient or protocol.local_gradients  # no all-reduce
        loss = None
        optimizer.zero_grad(set_to_none=True)
        if protocol.gradient_before_step:
            cheap = (
                statistics is not None
                and (not statistics.projections or self.hooks_serve_statistics)
                and sqnorms is None
                and not local
            )
            if cheap:  # the statistics pass gives the (already reduced) mean gradient
                result.statistics, loss = self._statistics_gradient(
                    batches, statistics, batch_size, result
                )
                statistics = None
            else:
                loss = forward_backward(
                    self.train_model,
                    batches,
                    self.loss_fn,
                    self.autocast,
                    not protocol.local_first_gradient,
                    sqnorms,
                )
            result.gradient(batch_size)
        if statistics is not None:
            reduced = protocol.gradient_before_step and not local
            result.statistics = self._statistics(batches, statistics, batch_size, result, reduced)

        def backward_closure() -> Tensor:
            result.gradient(batch_size)
            optimizer.zero_grad(set_to_none=True)
            sample = batches if protocol.closure == "same" else data.next(batch_size)
            return forward_backward(self.train_model, sample, self.loss_fn, self.autocast)

        loss_closure = self._loss_closure(batches, batch_size, result)
        kwargs = {}
        hessian_size = batch_size
        if protocol.hessian_sample and optimizer.hessian_due:
            kwargs["hessian_closure"], hessian_size = self._hessian_closure(
                data, batches, batch_size, result, loss_closure
            )
        if protocol.closure is None:
            result.returned = optimizer.step(**kwargs)
        elif protocol.closure_backward:
            result.returned = optimizer.step(backward_closure, **kwargs)
        else:
            result.returned = optimizer.step(loss_closure, **kwargs)
        if protocol.hessian_sample and isinstance(optimizer, ReportsStepStatistics):
            products = optimizer.step_statistics(["hessian_vector_products"])
            result.example_gradients += (
                HVP_COST * hessian_size * products["hessian_vector_products"]
            )
        result.loss = (loss if loss is not None else torch.as_tensor(result.returned)).detach()
        return result

    def _per_example_step(
        self,
        data: BatchStream,
        batches: list[Batch],
        batch_size: int,
        statistics: StatisticsRequest | None,
    ) -> StepResult:
        inputs, targets = concatenate(batches)
        model_params = {id(p): i for i, p in enumerate(self.model.parameters())}
        mine = [p for p in self.params if id(p) in model_params]
        with self.autocast():
            grads, losses = per_example_gradients_and_losses(
                self.model, self.loss_fn, inputs, targets, params=mine
            )
        by_param = {id(p): g for p, g in zip(mine, grads)}
        result = StepResult(losses.detach().float().mean(), None)
        result.gradient(batch_size)
        if statistics is not None:
            result.statistics = self._statistics(batches, statistics, batch_size, result, False)
        result.returned = self.optimizer.step(
            indices=data.indices, per_example_grads=[by_param.get(id(p)) for p in self.params]
        )
        return result

    # --- closures ------------------------------------------------------------------------

    def _mean_loss(self, batches: list[Batch]) -> Tensor:
        """The mean loss over micro-batches on the unwrapped module, with its graph."""
        total = None
        for inputs, targets in batches:
            with self.autocast():
                loss = self.loss_fn(self.model(inputs), targets)
            total = loss if total is None else total + loss
        return total / len(batches)

    def _loss_closure(
        self, batches: list[Batch], examples: int, result: StepResult
    ) -> Callable[[], Tensor]:
        """A ``closure_backward=False`` closure on ``batches``; counts a gradient when
        called with autograd on (the optimizer differentiates it), a forward otherwise."""

        def closure() -> Tensor:
            if torch.is_grad_enabled():
                result.gradient(examples)
            else:
                result.example_gradients += FORWARD_COST * examples
            return self._mean_loss(batches)

        return closure

    def _hessian_closure(
        self,
        data: BatchStream,
        batches: list[Batch],
        batch_size: int,
        result: StepResult,
        loss_closure: Callable[[], Tensor],
    ) -> tuple[Callable[[], Tensor], int]:
        """The loss closure on the Hessian sample and the sample's (global) size."""
        size = self.hessian_batch_size
        if size is None:
            return loss_closure, batch_size
        local = size // data.world_size
        if size <= batch_size:  # the review's S^H inside S: the first examples of the batch
            inputs, targets = concatenate(batches)
            sample = [(inputs[:local], targets[:local])]
        else:
            sample = [data.sample(size)]
        return self._loss_closure(sample, size, result), size

    def _full_gradient_closure(
        self, data: BatchStream, batch_size: int, result: StepResult
    ) -> Callable[[], Tensor]:
        """SVRG's snapshot closure: ``.grad`` = the gradient of the mean loss over the
        whole training set (summed over this process's shard, then across processes)."""

        def closure() -> Tensor:
            n = data.num_examples
            distributed_run = data.world_size > 1
            sums: list[Tensor | None] = [None] * len(self.params)
            total = None
            for inputs, targets in data.full_pass(self.full_pass_batch_size):
                with self.autocast():
                    loss = self.loss_fn(self.model(inputs), targets) * (len(inputs) / n)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                sums = [s if g is None else g if s is None else s + g for s, g in zip(sums, grads)]
                total = loss.detach() if total is None else total + loss.detach()
            if distributed_run:  # every rank reduces every parameter, used here or not
                sums = [torch.zeros_like(p) if s is None else s for s, p in zip(sums, self.params)]
                present = [s for s in sums if s is not None]
                flat = all_reduce_sum(
                    torch.cat([total.reshape(1), *(s.reshape(-1) for s in present)])
                )
                total = flat[0]
                pieces = torch.split(flat[1:], [s.numel() for s in present])
                sums = [piece.view_as(s) for piece, s in zip(pieces, present)]
            for p, s in zip(self.params, sums):
                p.grad = s
            result.gradient_evaluations += math.ceil(n / batch_size)
            result.example_gradients += n
            return total

        return closure

    # --- statistics for a batch-size controller ------------------------------------------

    def _statistics_gradient(
        self,
        batches: list[Batch],
        request: StatisticsRequest,
        batch_size: int,
        result: StepResult,
    ) -> tuple[GradientStatistics, Tensor]:
        """The cheap path: statistics and mean gradient from one pass (with projections, a
        second when the batch spans several chunks); the mean (already reduced across
        processes) goes into ``.grad``. Returns them and the loss."""
        inputs, targets = concatenate(batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        with self.autocast():
            stats, mean = gradient_statistics(
                self.model,
                self.loss_fn,
                inputs,
                targets,
                params=params,
                group_size=request.group_size,
                chunk_size=request.chunk_size,
                projections=request.projections,
            )
        for p, g in zip(params, mean):
            p.grad = g
        if request.projections and _chunk_count(len(inputs), request) > 1:
            result.example_gradients += batch_size
        return stats, torch.tensor(stats.mean_loss)

    def _statistics(
        self,
        batches: list[Batch],
        request: StatisticsRequest,
        batch_size: int,
        result: StepResult,
        gradient_in_grad: bool,
    ) -> GradientStatistics:
        """The batch's statistics from a pass of their own (before the optimizer's step).

        With ``gradient_in_grad`` the step's reduced gradient in ``.grad`` is the mean,
        so one pass computes everything; otherwise the pass computes the mean too,
        and ``S3`` a second pass when the batch spans several chunks.
        """
        inputs, targets = concatenate(batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        mean = None
        if gradient_in_grad:
            mean = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        with self.autocast():
            stats, _ = gradient_statistics(
                self.model,
                self.loss_fn,
                inputs,
                targets,
                mean_gradient=mean,
                params=params,
                group_size=request.group_size,
                chunk_size=request.chunk_size,
                projections=request.projections,
            )
        chunks = _chunk_count(len(inputs), request)
        passes = 2 if mean is None and request.projections and chunks > 1 else 1
        result.example_gradients += passes * batch_size
        return stats


def _chunk_count(examples: int, request: StatisticsRequest) -> int:
    """The passes of ``request.chunk_size`` samples a batch of ``examples`` takes."""
    return math.ceil(examples / request.group_size / request.chunk_size)


def forward_backward(
    model: nn.Module,
    micro_batches: list[Batch],
    loss_fn: LossFn,
    autocast: Callable,
    sync: bool = True,
    sqnorms: list[Tensor] | None = None,
) -> Tensor:
    """Accumulate in ``.grad`` the gradient of the mean loss over ``micro_batches``.

    Each micro-batch's loss is divided by their number, so the sum of their
    gradients is the gradient of the global batch. Under DDP, gradients are
    averaged across processes on the last micro-batch only, and not at all
    unless ``sync``. Returns this process's mean loss.

    ``sqnorms``, if given, receives the squared norms of the first micro-batch's
    gradient (as if alone) and of the whole batch's: the noise-scale estimate's
    two batch sizes, read without changing the gradients.
    """
    count = len(micro_batches)
    total = None
    for i, (inputs, targets) in enumerate(micro_batches):
        with distributed.no_sync(model, skip_sync=not (sync and i == count - 1)):
            with autocast():
                loss = loss_fn(model(inputs), targets)
                if count > 1:
                    loss = loss / count
            loss.backward()
        if sqnorms is not None and i == 0:
            sqnorms.append(gradient_sqnorm(model.parameters()) * count**2)
        total = loss.detach() if total is None else total + loss.detach()
    if sqnorms is not None:
        sqnorms.append(gradient_sqnorm(model.parameters()))
    return total


def statistics_columns(optimizer: torch.optim.Optimizer) -> list[str]:
    """``metrics.csv`` columns of the optimizer's per-step statistics (``opt_<name>``)."""
    if not isinstance(optimizer, ReportsStepStatistics):
        return []
    return [f"opt_{name}" for name in optimizer.STATISTICS]


def statistics_row(optimizer: torch.optim.Optimizer) -> dict[str, float | str]:
    """The last step's statistics as ``metrics.csv`` values (empty where not measured)."""
    if not isinstance(optimizer, ReportsStepStatistics):
        return {}
    values = optimizer.step_statistics()
    return {f"opt_{k}": "" if math.isnan(v) else v for k, v in values.items()}
