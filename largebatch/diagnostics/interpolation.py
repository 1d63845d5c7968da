"""The loss landscape along lines and planes: checkpoint interpolation and random slices.

* :func:`interpolate_checkpoints`: loss and metrics along ``(1 - a) x_A + a x_B``
  for ``a`` in [-1, 2] (Keskar et al. 2017, Fig. 3: ``x_A`` the small-batch and
  ``x_B`` the large-batch solution), on each data split given (train and test).
* :func:`filter_normalized_direction` and :func:`loss_slice`: 1-D and 2-D slices
  ``x + a d1 (+ b d2)`` along random directions rescaled filter by filter to the
  weights' norms (Li et al. 2018), so slices of different networks are comparable.

Batch norm. Interpolation works on whole state dicts, so with
``batch_norm="interpolate"`` (the default, as in Keskar et al.'s PyTorch code
and Li et al.'s ``states`` directions) the running statistics are interpolated
too; ``batch_norm="recompute"`` instead resets them at every point and
recomputes them from ``recompute_batches`` in train mode, which gives the
network's own statistics at the interpolated weights (the curve between two BN
networks differs between the two). Slices perturb parameters only (Li et al.'s
``weights`` directions): buffers keep the base model's values; 1-D parameters
(biases, BN scales and shifts) are left out of the direction by default.
Everything is evaluated in eval mode and the model is restored on return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from largebatch.diagnostics.evaluation import (
    Batches,
    LossFn,
    MetricFn,
    Result,
    check_batches,
    evaluate,
    model_device,
    on_device,
    trainable_parameters,
    unwrap,
)

BatchNormMode = Literal["interpolate", "recompute"]
DEFAULT_ALPHAS = np.linspace(-1.0, 2.0, 25)  # Keskar et al.'s code: 25 points, 0 and 1 exact
DEFAULT_SLICE_COORDINATES = np.linspace(-1.0, 1.0, 21)


@dataclass
class InterpolationResult(Result):
    """``curves[split][metric][i]`` is the value at ``alphas[i]`` (0 is A, 1 is B)."""

    alphas: list[float]
    curves: dict[str, dict[str, list[float]]]
    batch_norm: str


@dataclass
class SliceResult(Result):
    """Values on a 1-D line (shape ``(m,)``) or a 2-D grid (shape ``(m, m)``, rows along d1)."""

    coordinates: list[float]
    values: dict[str, np.ndarray]


def interpolate_checkpoints(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    splits: Mapping[str, Batches],
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    metrics: Mapping[str, MetricFn] | None = None,
    batch_norm: BatchNormMode = "interpolate",
    recompute_batches: Batches | None = None,
) -> InterpolationResult:
    """Loss and metrics of ``model`` loaded with ``(1 - a) * state_a + a * state_b``.

    Args:
        model: a network of the architecture both state dicts belong to.
        splits: split name -> fixed batches, e.g. ``{"train": ..., "test": ...}``.
        alphas: interpolation coefficients; the default is 25 points in [-1, 2].
        metrics: per-example metrics (e.g. the task's accuracy).
        batch_norm: ``"interpolate"`` the running statistics with the weights, or
            ``"recompute"`` them at each point from ``recompute_batches``.
        recompute_batches: data for ``"recompute"`` (default: ``splits["train"]``).

    Non-floating entries (``num_batches_tracked``) are taken from ``state_a``.
    """
    model = unwrap(model)
    missing = set(state_a) ^ set(state_b)
    if missing:
        raise ValueError(f"Invalid state dicts: keys in only one of them: {sorted(missing)}")
    if batch_norm not in ("interpolate", "recompute"):
        raise ValueError(
            f"Invalid batch_norm: {batch_norm!r} (expected 'interpolate' or 'recompute')"
        )
    if batch_norm == "recompute":
        recompute_batches = check_batches(
            recompute_batches if recompute_batches is not None else _train_split(splits)
        )
    if not splits:
        raise ValueError("Invalid splits: none given")
    splits = {name: check_batches(batches) for name, batches in splits.items()}
    device = model_device(model)
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    curves: dict[str, dict[str, list[float]]] = {name: {} for name in splits}
    try:
        for alpha in alphas:
            model.load_state_dict(_mix(state_a, state_b, float(alpha), device))
            if batch_norm == "recompute":
                _recompute_batch_norm(model, recompute_batches)
            for split, batches in splits.items():
                for metric, value in evaluate(model, loss_fn, batches, metrics).items():
                    curves[split].setdefault(metric, []).append(value)
    finally:
        model.load_state_dict(saved)
    return InterpolationResult(
        alphas=[float(a) for a in alphas], curves=curves, batch_norm=batch_norm
    )


def _train_split(splits: Mapping[str, Batches]) -> Batches:
    if "train" not in splits:
        raise ValueError("batch_norm='recompute' needs recompute_batches or a 'train' split")
    return splits["train"]


def _mix(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alpha: float,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) a + alpha b`` per floating entry (exactly a at 0 and b at 1)."""
    mixed = {}
    for name, a in state_a.items():
        a = a.to(device)
        b = state_b[name].to(device)
        mixed[name] = (1 - alpha) * a + alpha * b if a.is_floating_point() else a
    return mixed


def _recompute_batch_norm(model: nn.Module, batches: Batches) -> None:
    """Reset batch-norm running statistics and re-estimate them from ``batches``.

    With ``momentum=None`` torch keeps a plain average over the batches of each
    batch's mean and unbiased variance ("precise BN"), independent of their order.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for inputs, _, _ in on_device(batches, model_device(model)):
                model(inputs)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for module, flag in flags.items():
            module.training = flag


def filter_normalized_direction(
    model: nn.Module, *, seed: int = 0, one_dim: Literal["zero", "copy"] = "zero"
) -> list[torch.Tensor]:
    """A random direction, one tensor per trainable parameter, filter-normalised.

    For each weight with two or more dimensions, every filter (slice along the
    first, output dimension) of a Gaussian direction is rescaled to the norm of
    the weight's filter. 1-D parameters (biases, norm scales) get ``"zero"``
    (Li et al.'s ``biasbn`` option) or a ``"copy"`` of the weights.
    """
    if one_dim not in ("zero", "copy"):
        raise ValueError(f"Invalid one_dim: {one_dim!r} (expected 'zero' or 'copy')")
    generator = torch.Generator().manual_seed(seed)
    direction = []
    for param in trainable_parameters(unwrap(model)):
        weight = param.detach()
        if weight.dim() <= 1:
            direction.append(torch.zeros_like(weight) if one_dim == "zero" else weight.clone())
            continue
        gaussian = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(
            weight.device
        )
        filters = gaussian.flatten(1)
        norms = weight.flatten(1).norm(dim=1, keepdim=True) / (
            filters.norm(dim=1, keepdim=True) + 1e-10
        )
        direction.append((filters * norms).view_as(weight))
    return direction


def loss_slice(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: Sequence[Sequence[torch.Tensor]],
    *,
    coordinates: Sequence[float] | np.ndarray = DEFAULT_SLICE_COORDINATES,
    metrics: Mapping[str, MetricFn] | None = None,
) -> SliceResult:
    """Loss and metrics at ``x + a d1`` (one direction) or ``x + a d1 + b d2`` (two).

    ``directions`` holds one or two directions from :func:`filter_normalized_direction`;
    ``a`` and ``b`` run over ``coordinates``.
    """
    model = unwrap(model)
    params = trainable_parameters(model)
    if len(directions) not in (1, 2):
        raise ValueError(f"Invalid directions: expected 1 or 2, got {len(directions)}")
    for direction in directions:
        if [d.shape for d in direction] != [p.shape for p in params]:
            raise ValueError("Invalid direction: its shapes do not match the model's parameters")
    check_batches(batches)
    coords = [float(c) for c in coordinates]
    grid = (
        np.array(np.meshgrid(*([coords] * len(directions)), indexing="ij"))
        .reshape(len(directions), -1)
        .T
    )
    origin = [p.detach().clone() for p in params]
    values: dict[str, list[float]] = {}
    try:
        for point in grid:
            with torch.no_grad():
                for i, (param, base) in enumerate(zip(params, origin)):
                    param.copy_(
                        base + sum(c * direction[i] for c, direction in zip(point, directions))
                    )
            for metric, value in evaluate(model, loss_fn, batches, metrics).items():
                values.setdefault(metric, []).append(value)
    finally:
        with torch.no_grad():
            for param, base in zip(params, origin):
                param.copy_(base)
    shape = (len(coords),) * len(directions)
    return SliceResult(
        coordinates=coords, values={name: np.array(v).reshape(shape) for name, v in values.items()}
    )
