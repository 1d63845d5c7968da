"""Per-example gradients and the batch statistics of the adaptive sampling tests.

Gradients of every example's loss come from ``torch.func``: ``vmap`` over
``grad`` of the loss of one sample, with the model called through
``functional_call``. A *sample* is one example (``group_size=1``, exact) or the
mean of ``group_size`` consecutive examples (the micro-batch approximation of
Bottou, Curtis & Nocedal 2018, Sec. 5.2: a group's gradient has covariance
``Sigma / group_size``, which the statistics undo; fewer, cheaper samples, so a
noisier estimate). Batches are processed ``chunk_size`` samples at a time, so
memory stays at ``chunk_size`` gradient copies whatever the batch size.

:func:`gradient_statistics` needs only the samples' squared norms and
projections, not their gradients: by default (``method="auto"``) it reads them
off one ordinary forward and backward pass per chunk through module hooks
(:mod:`~largebatch.diagnostics.per_example_hooks`, several times cheaper), and
falls back to ``vmap``, the reference, for models the hooks do not cover.

:func:`gradient_statistics` reduces a batch to four numbers, from which
:class:`GradientStatistics` gives the per-example variances of the three tests
(``g_i`` the sample gradients, ``g`` their mean, ``K`` samples of ``m`` examples)::

    trace_covariance       = m * sum ||g_i - g||^2 / (K - 1)                 # norm test
    inner_product_variance = m * sum (g_i^T g - ||g||^2)^2 / (K - 1)         # inner-product test
    orthogonal_variance    = m * sum ||g_i - (g_i^T g / ||g||^2) g||^2 / (K - 1)   # orthogonality test

using ``sum ||g_i - g||^2 = S1 - K ||g||^2``, ``sum (g_i^T g - ||g||^2)^2 = S3 - K ||g||^4`` and
``sum ||g_i - proj||^2 = S1 - S3 / ||g||^2`` with ``S1 = sum ||g_i||^2``, ``S3 = sum (g_i^T g)^2``.
Per-sample norms and products are computed in the gradients' dtype and summed
in float64 (no cancellation near a test's boundary: there ``||g||^2`` is about
``tr(Sigma) / (theta^2 b)``, far below ``S1 / K``). Under ``torch.distributed`` each rank
passes its own shard and the sums (and the mean gradient, when computed here)
go through the ``reduce`` hook, an all-reduce sum by default, so the statistics
are those of the union of the ranks' examples.

Models with batch norm in train mode have no per-example gradients (the
statistics couple the examples): call ``model.eval()`` first or use group norm.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from largebatch.diagnostics.evaluation import LossFn, Result, all_reduce_sum, unwrap
from largebatch.diagnostics.per_example_hooks import HookRecorder, UnsupportedModel, check_means

Reduce = Callable[[Tensor], Tensor]


@dataclass
class GradientStatistics(Result):
    """Sums over a batch's sample gradients ``g_i`` and their mean ``g`` (module docstring).

    Attributes:
        num_samples: ``K``, the number of sample gradients.
        group_size: ``m``, examples per sample (1: per-example gradients).
        mean_sqnorm: ``||g||^2``.
        sum_sqnorms: ``S1 = sum ||g_i||^2``.
        sum_projections_sq: ``S3 = sum (g_i^T g)^2``, or NaN where not computed.
        mean_loss: the batch's mean loss (what a backward pass would have returned).
    """

    num_samples: int
    group_size: int
    mean_sqnorm: float
    sum_sqnorms: float
    sum_projections_sq: float
    mean_loss: float = float("nan")

    @property
    def batch_size(self) -> int:
        """Examples in the batch: ``K * m``."""
        return self.num_samples * self.group_size

    def _per_example(self, total: float) -> float:
        return self.group_size * total / (self.num_samples - 1)

    @property
    def trace_covariance(self) -> float:
        """``tr(Sigma)``, the per-example gradient variance (unbiased estimate)."""
        return self._per_example(self.sum_sqnorms - self.num_samples * self.mean_sqnorm)

    @property
    def inner_product_variance(self) -> float:
        """``Var(g_i^T g)`` per example."""
        return self._per_example(self.sum_projections_sq - self.num_samples * self.mean_sqnorm**2)

    @property
    def orthogonal_variance(self) -> float:
        """``E||g_i - (g_i^T g / ||g||^2) g||^2`` per example."""
        return self._per_example(self.sum_sqnorms - self.sum_projections_sq / self.mean_sqnorm)


def _check_mode(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"Invalid model: {name or type(module).__name__} is a batch norm in train mode; "
                "per-example gradients need model.eval() (or a norm without batch statistics)"
            )


def _sample_gradient_fn(
    model: nn.Module, loss_fn: LossFn, names: Sequence[str]
) -> Callable[[dict[str, Tensor], Tensor, Tensor], tuple[dict[str, Tensor], Tensor]]:
    """``vmap(grad_and_value)`` of one sample's mean loss, over a leading sample dimension."""

    def sample_loss(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(functional_call(model, params, (inputs,)), targets)

    return vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")


def _chunks(
    inputs: Tensor, targets: Tensor, group_size: int, chunk_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` reshaped to ``(samples, group_size, ...)``, ``chunk_size`` samples at a time."""
    if group_size < 1 or len(inputs) % group_size:
        raise ValueError(
            f"Invalid group_size: {group_size} (expected a divisor of the batch size {len(inputs)})"
        )
    if chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size} (expected >= 1)")
    samples = len(inputs) // group_size
    grouped_inputs = inputs.reshape(samples, group_size, *inputs.shape[1:])
    grouped_targets = targets.reshape(samples, group_size, *targets.shape[1:])
    for start in range(0, samples, chunk_size):
        yield (
            grouped_inputs[start : start + chunk_size],
            grouped_targets[start : start + chunk_size],
        )


class _SampleGradients:
    """The sample gradients of a model's chosen parameters, chunk by chunk."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter] | None
    ) -> None:
        model = unwrap(model)
        _check_mode(model)
        chosen = list(model.parameters()) if params is None else list(params)
        named = {id(p): name for name, p in model.named_parameters()}
        missing = [i for i, p in enumerate(chosen) if id(p) not in named]
        if missing:
            raise ValueError(f"Invalid params: entries {missing} are not parameters of the model")
        self.model, self.loss_fn, self.params = model, loss_fn, chosen
        self.names = [named[id(p)] for p in chosen]
        self.values = {name: p.detach() for name, p in zip(self.names, chosen)}
        self.function = _sample_gradient_fn(model, loss_fn, self.names)

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[list[Tensor], Tensor]:
        """The samples' gradients (one tensor per parameter) and their losses."""
        grads, losses = self.function(self.values, inputs, targets)
        return [grads[name] for name in self.names], losses


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[nn.Parameter] | None = None,
    group_size: int = 1,
    chunk_size: int = 256,
) -> list[Tensor]:
    """Gradients of each sample's loss: one tensor per parameter, ``(K, *param.shape)``.

    ``params`` defaults to all the model's parameters, in ``model.parameters()``
    order (the order SAGA's ``per_example_grads`` expects). Memory: the result
    holds ``K`` copies of the parameters.
    """
    return per_example_gradients_and_losses(
        model, loss_fn, inputs, targets, params=params, group_size=group_size, chunk_size=chunk_size
    )[0]


def per_example_gradients_and_losses(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[nn.Parameter] | None = None,
    group_size: int = 1,
    chunk_size: int = 256,
) -> tuple[list[Tensor], Tensor]:
    """:func:`per_example_gradients` and each sample's loss (``(K,)``), from the same pass."""
    gradients = _SampleGradients(model, loss_fn, params)
    pieces = [gradients(x, y) for x, y in _chunks(inputs, targets, group_size, chunk_size)]
    grads = [torch.cat(parts) for parts in zip(*(g for g, _ in pieces))]
    return grads, torch.cat([losses for _, losses in pieces])


def _sqnorms(grads: Sequence[Tensor]) -> Tensor:
    """Squared norm of every sample's gradient (float64, one per sample)."""
    return sum(torch.linalg.vecdot(flat, flat) for flat in _rows(grads)).double()


def _projections(grads: Sequence[Tensor], mean: Sequence[Tensor]) -> Tensor:
    """``g_i^T g`` for every sample (float64)."""
    return sum(flat @ m.reshape(-1).to(flat.dtype) for flat, m in zip(_rows(grads), mean)).double()


def _rows(grads: Sequence[Tensor]) -> list[Tensor]:
    """Each parameter's sample gradients as a ``(samples, numel)`` matrix."""
    return [g.reshape(len(g), -1) for g in grads]


class _VmapChunk:
    """One chunk's sample gradients, materialised by ``vmap``."""

    def __init__(self, gradients: _SampleGradients, inputs: Tensor, targets: Tensor) -> None:
        self.grads, losses = gradients(inputs, targets)
        self.loss_sum = losses.double().sum()

    def sqnorms(self) -> Tensor:
        return _sqnorms(self.grads)

    def projections(self, mean: Sequence[Tensor]) -> Tensor:
        return _projections(self.grads, mean)

    def gradient_sums(self) -> list[Tensor]:
        return [g.sum(0) for g in self.grads]


class _HookChunk:
    """One chunk's sample gradients from an ordinary forward and backward pass (module hooks)."""

    def __init__(
        self,
        recorder: HookRecorder,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Tensor,
        targets: Tensor,
    ) -> None:
        samples, group_size = inputs.shape[:2]
        batch = samples * group_size
        params = recorder.params
        with torch.enable_grad(), recorder:
            loss = loss_fn(model(inputs.flatten(0, 1)), targets.flatten(0, 1))
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        self.pieces = recorder.sample_gradients(batch, group_size, samples)
        check_means(self.pieces, {id(p): g for p, g in zip(params, grads)})
        self.position = {id(p): i for i, p in enumerate(params)}
        self.grads = grads
        self.samples = samples
        self.loss_sum = loss.detach().double() * samples

    def sqnorms(self) -> Tensor:
        return sum(sample.sqnorms().double() for _, sample in self.pieces)

    def projections(self, mean: Sequence[Tensor]) -> Tensor:
        return sum(
            sample.projections(mean[self.position[id(p)]]).double() for p, sample in self.pieces
        )

    def gradient_sums(self) -> list[Tensor]:
        return [g.detach() * self.samples for g in self.grads]


def _chunk_evaluator(
    gradients: _SampleGradients, method: str
) -> Callable[[Tensor, Tensor], _VmapChunk | _HookChunk]:
    """``(inputs, targets) -> chunk`` for ``method`` (``UnsupportedModel``: hooks cannot serve)."""
    if method == "vmap":
        return lambda x, y: _VmapChunk(gradients, x, y)
    if method not in ("auto", "hooks"):
        raise ValueError(f"Invalid method: {method!r} (expected 'auto', 'hooks' or 'vmap')")
    recorder = HookRecorder(gradients.model, gradients.params)
    return lambda x, y: _HookChunk(recorder, gradients.model, gradients.loss_fn, x, y)


def gradient_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    mean_gradient: Sequence[Tensor] | None = None,
    params: Sequence[nn.Parameter] | None = None,
    group_size: int = 1,
    chunk_size: int = 256,
    projections: bool = True,
    reduce: Reduce = all_reduce_sum,
    method: str = "auto",
) -> tuple[GradientStatistics, list[Tensor]]:
    """The batch's :class:`GradientStatistics` and its mean gradient.

    Args:
        model, loss_fn, inputs, targets: the batch (this rank's shard under DDP);
            ``loss_fn`` returns the mean loss of its batch.
        mean_gradient: the batch's mean gradient if the caller has it (the
            training step's ``.grad``, all-reduced under DDP): then one pass
            computes everything. Without it the mean is accumulated from the
            samples (and reduced), and the step can use it instead of a backward
            pass; ``S3`` then needs a second pass unless the batch is one chunk.
        params: the parameters (default: all of the model's).
        group_size: examples per sample (1 for exact per-example statistics).
        chunk_size: samples per pass (bounds memory).
        projections: compute ``S3`` (the inner-product and orthogonality tests
            need it; the norm test does not).
        reduce: sums a float64 tensor across ranks in place (default: all-reduce
            when torch.distributed is initialised, else nothing).
        method: ``"hooks"`` (one ordinary forward and backward pass per chunk,
            :mod:`~largebatch.diagnostics.per_example_hooks`), ``"vmap"``, or
            ``"auto"``: hooks where they support the model, else ``vmap``.

    Returns:
        The statistics (with the batch's mean loss) and the mean gradient (one
        tensor per parameter).
    """
    gradients = _SampleGradients(model, loss_fn, params)
    chunks = list(_chunks(inputs, targets, group_size, chunk_size))
    try:
        evaluate = _chunk_evaluator(gradients, method)
        first = evaluate(*chunks[0])
    except UnsupportedModel:
        if method == "hooks":
            raise
        evaluate = _chunk_evaluator(gradients, "vmap")
        first = evaluate(*chunks[0])
    evaluated = itertools.chain([first], (evaluate(x, y) for x, y in chunks[1:]))
    device = gradients.params[0].device
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # samples, S1, S3, sum of losses
    counts[0] = len(inputs) // group_size
    if mean_gradient is None:
        total = [
            torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in gradients.params
        ]
        for chunk in evaluated:
            counts[1] += chunk.sqnorms().sum()
            counts[3] += chunk.loss_sum
            for t, g in zip(total, chunk.gradient_sums()):
                t += g
        flat = reduce(torch.cat([counts[[0, 1, 3]], *(t.reshape(-1) for t in total)]))
        counts[[0, 1, 3]] = flat[:3]
        exact = [
            piece.view_as(t)
            for piece, t in zip(
                torch.split(flat[3:] / counts[0], [t.numel() for t in total]), total
            )
        ]
        mean = [m.to(p.dtype) for m, p in zip(exact, gradients.params)]
        if projections:
            # S3 needs the mean: the only chunk's gradients are still here, others are recomputed
            again = [chunk] if len(chunks) == 1 else (evaluate(x, y) for x, y in chunks)
            for chunk in again:
                counts[2] += chunk.projections(exact).pow(2).sum()
            counts[2:3] = reduce(counts[2:3].clone())
    else:
        mean = exact = [m.detach() for m in mean_gradient]
        for chunk in evaluated:
            counts[1] += chunk.sqnorms().sum()
            counts[3] += chunk.loss_sum
            if projections:
                counts[2] += chunk.projections(mean).pow(2).sum()
        counts = reduce(counts)
    statistics = GradientStatistics(
        num_samples=int(counts[0]),
        group_size=group_size,
        mean_sqnorm=float(sum(m.double().pow(2).sum() for m in exact)),
        sum_sqnorms=float(counts[1]),
        sum_projections_sq=float(counts[2]) if projections else float("nan"),
        mean_loss=float(counts[3] / counts[0]),
    )
    return statistics, mean
