"""Helpers every built-in task shares: in-memory datasets, seeded splits, option checks.

Built-in data sets are small, so they live in memory as ``TensorDataset``s of
float32 inputs (int64 for token ids) and int64 class targets: loaders are fast and
deterministic, and a split is a seeded permutation of row indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from largebatch.tasks.base import Task
from largebatch.utils.errors import ConfigError


def check_positive_int(name: str, value: int) -> None:
    """``ConfigError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Invalid {name}: {value!r} (expected an integer >= 1)")


def check_positive_ints(**values: int) -> None:
    """:func:`check_positive_int` for each keyword argument (its name is the option's)."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_seed(seed: int) -> None:
    """``ConfigError`` unless ``seed`` is an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"Invalid seed: {seed!r} (expected an integer >= 0)")


def check_num_classes(num_classes: int) -> None:
    """A classification problem needs an integer number of classes, at least 2."""
    check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ConfigError(f"Invalid num_classes: {num_classes} (expected at least 2)")


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    """``ConfigError`` naming ``name`` unless ``value`` lies in (0, 1), or [0, 1) with ``allow_zero``."""
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"Invalid {name}: {value!r} (expected a number in {interval})")


def tensor_dataset(
    inputs: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor
) -> TensorDataset:
    """A ``TensorDataset`` with float32 inputs (integer inputs stay int64) and int64 targets."""
    x = torch.as_tensor(inputs)
    x = x.long() if not x.is_floating_point() else x.float()
    return TensorDataset(x, torch.as_tensor(targets).long())


def split_rows(
    inputs: torch.Tensor, targets: torch.Tensor, fractions: Sequence[float], seed: int
) -> list[TensorDataset]:
    """Shuffle rows with ``seed`` (not the global RNG) and cut them into ``[rest, *fraction parts]``.

    Each part gets ``round(fraction * n)`` rows, at least one; ``rest`` keeps the
    remainder and must not end up empty.
    """
    n = len(targets)
    sizes = [max(1, round(f * n)) for f in fractions]
    rest = n - sum(sizes)
    if rest < 1:
        raise ConfigError(
            f"Cannot split {n} examples into fractions {list(fractions)}: nothing left"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(order, [rest, *sizes])
    return [tensor_dataset(inputs[idx], targets[idx]) for idx in parts]


def carve_val(
    train: TensorDataset, val_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset | None]:
    """Split a seeded ``val_fraction`` of ``train`` off as the validation set.

    The validation set comes from training data, never from test data, so it can
    be used to pick hyperparameters; ``val_fraction == 0`` gives no validation set.
    """
    check_fraction("val_fraction", val_fraction, allow_zero=True)
    if val_fraction == 0:
        return train, None
    inputs, targets = train.tensors
    rest, val = split_rows(inputs, targets, [val_fraction], seed)
    return rest, val


def classification_task(
    name: str,
    train: TensorDataset,
    test: TensorDataset,
    build_model: Callable[[], nn.Module],
    target_accuracy: float,
    val_fraction: float,
    val_seed: int,
) -> Task:
    """A classification :class:`Task` (cross-entropy loss, accuracy target) on in-memory data.

    A seeded ``val_fraction`` of ``train`` becomes the validation split (:func:`carve_val`).
    """
    train, val = carve_val(train, val_fraction, val_seed)
    return Task(
        name=name,
        train=train,
        val=val,
        test=test,
        build_model=build_model,
        loss_fn=F.cross_entropy,
        target_metric=("accuracy", target_accuracy),
    )
