"""Shared plumbing for the diagnostics: fixed data, a fixed function, flat parameters.

Every diagnostic looks at the training loss as a deterministic function of the
weights. Three things make it one:

* **fixed data**: a re-iterable collection of ``(inputs, targets)`` batches that
  yields the same examples on every pass (a list, or a ``DataLoader`` without
  random augmentation; :func:`fixed_subset` draws a seeded subset);
* **fixed mode**: train or eval mode chosen explicitly (batch norm and dropout
  change the function), with batch-norm running statistics restored afterwards;
* **fixed randomness**: the global RNG re-seeded on every pass, so dropout masks
  (in train mode) are the same each time the function is evaluated.

Losses are assumed to be means over the batch (the :class:`~largebatch.tasks.base.Task`
contract), so a pass over several batches weights each by its size. Under
``torch.distributed`` each rank passes its own shard and the sums are all-reduced,
so every result is over the union of the ranks' data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

Batch = tuple[torch.Tensor, torch.Tensor]
Batches = Iterable[Batch]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Result:
    """Base of the result dataclasses: ``to_dict()`` gives JSON-ready values.

    Fields declared with ``repr=False`` (large tensors such as eigenvectors) are
    left out; numpy arrays become nested lists.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.repr}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def fixed_subset(
    dataset: Dataset, num_examples: int | None = None, *, batch_size: int = 1024, seed: int = 0
) -> list[Batch]:
    """A seeded random subset of ``dataset`` as a list of batches (all of it if ``None``).

    The same ``(dataset, num_examples, seed)`` always gives the same examples, so
    diagnostics of different checkpoints are comparable.
    """
    size = len(dataset)
    if num_examples is not None and not 0 < num_examples <= size:
        raise ValueError(f"Invalid num_examples: {num_examples} (dataset has {size})")
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size}")
    if num_examples is not None:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(size, generator=generator)[:num_examples].tolist()
        dataset = Subset(dataset, indices)
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def check_batches(batches: Batches) -> Batches:
    """Reject one-shot iterators: every diagnostic passes over the data many times."""
    if iter(batches) is batches:
        raise TypeError(
            f"batches must be re-iterable (a list or a DataLoader), got a one-shot {type(batches).__name__}"
        )
    return batches


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    return next(model.parameters(), torch.empty(0)).device


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (its hooks must not fire here)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_parameters(
    model: nn.Module, params: Iterable[nn.Parameter] | None = None
) -> list[nn.Parameter]:
    """The parameters a diagnostic perturbs: ``params`` or all that require grad."""
    chosen = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not chosen:
        raise ValueError("Invalid params: no parameter requires grad")
    return chosen


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    pieces = torch.split(vector, [t.numel() for t in like])
    return [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, like)]


@contextlib.contextmanager
def fixed_function(model: nn.Module, *, train: bool, seed: int) -> Iterator[None]:
    """Evaluate ``model`` in the given mode with seeded RNG, then restore it.

    Restores the train/eval flags of all sub-modules and every buffer (batch-norm
    running statistics move during train-mode forwards).
    """
    flags = {module: module.training for module in model.modules()}
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    device = model_device(model)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            model.train(train)
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def on_device(
    batches: Batches, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Yield ``(inputs, targets, batch size)`` with tensors moved to ``device``.

    One pass; callers that pass over the data again check it with :func:`check_batches`.
    """
    for inputs, targets in batches:
        yield inputs.to(device), targets.to(device), len(targets)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    metrics: Mapping[str, MetricFn] | None = None,
    *,
    train: bool = False,
    seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss and mean per-example metrics of ``model`` over ``batches``.

    Returns ``{"loss": ..., name: ...}`` for each metric (e.g. ``accuracy``).
    One pass over ``batches`` (any iterable). Forward passes and losses run
    inside ``autocast()`` (the training loop's bfloat16 autocast, if any). The
    training loop evaluates with this function too.
    """
    model = unwrap(model)
    device = model_device(model)
    names = ["loss", *(metrics or {})]
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    with fixed_function(model, train=train, seed=seed), torch.no_grad():
        for inputs, targets, n in on_device(batches, device):
            with autocast():
                outputs = model(inputs)
                sums[0] += n * loss_fn(outputs, targets).double()
                for i, metric in enumerate((metrics or {}).values(), start=1):
                    sums[i] += metric(outputs, targets).double().sum()
            sums[-1] += n
    all_reduce_sum(sums)
    if sums[-1] == 0:
        raise ValueError("Invalid batches: no examples")
    return dict(zip(names, (sums[:-1] / sums[-1]).tolist()))


def loss_and_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Batches, params: Sequence[nn.Parameter]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss (float64 scalar) and its flat gradient w.r.t. ``params``.

    Call inside :func:`fixed_function`; ``model`` must already be unwrapped.
    """
    device = params[0].device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    grad = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets, n in on_device(batches, device):
        batch_loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(batch_loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        loss += n * batch_loss.detach().double()
        grad += n * flatten(grads).double()
        count += n
    totals = all_reduce_sum(torch.cat([loss.reshape(1), count.reshape(1), grad]))
    return totals[0] / totals[1], totals[2:] / totals[1]
