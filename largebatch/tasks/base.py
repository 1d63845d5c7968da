"""What a task is: data, a model, a loss and metrics.

Built-in tasks and user tasks (``--task package.module:function``) both return a
:class:`Task`. Everything a training run, a sweep or a diagnostic needs to know
about the problem is here, so those layers never special-case a task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example 0/1 correctness of the arg-max class."""
    return (output.argmax(dim=-1) == target).float()


@dataclass
class Task:
    """A supervised learning problem.

    Attributes:
        name: registry name, or ``module:function`` for a user task.
        train: training examples; items are ``(input, target)`` pairs.
        test: held-out examples, used only for reporting.
        build_model: returns a freshly initialised model; called after seeding,
            so the initialisation is reproducible.
        loss_fn: ``loss_fn(output, target)`` -> mean loss over the batch (scalar).
        val: optional validation split for hyperparameter selection (never ``test``).
        metrics: name -> ``fn(output, target)`` returning one value per example;
            evaluation averages them over the split. Accuracy by default.
        target_metric: (name, value) a run may stop at, e.g. ``("accuracy", 0.9)``.
        description: one line for ``largebatch list tasks``.
    """

    name: str
    train: Dataset
    test: Dataset
    build_model: Callable[[], nn.Module]
    loss_fn: LossFn
    val: Dataset | None = None
    metrics: Mapping[str, MetricFn] = field(default_factory=lambda: {"accuracy": accuracy})
    target_metric: tuple[str, float] | None = None
    description: str = ""
