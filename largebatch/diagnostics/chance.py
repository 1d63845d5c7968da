"""Chance level: the training loss and accuracy of a classifier that has learned nothing.

A cross-entropy classifier that ignores its input does best by predicting the
class frequencies of the training set; its loss is their entropy, ``ln K`` for
``K`` balanced classes (2.303 for ten), and its accuracy that of always answering
the most frequent class. A run that ends no better than that on both counts, or
with a training loss more than twice the chance loss (worse than chance), has
learned nothing, typically because a too-large learning rate pushed it to a
constant output (dead ReLUs), and its accuracy is not a result: the training
loop reports it with status ``"chance"``, next to ``"diverged"``, and sweeps,
the report and the studies flag it the same way. (A network that ranks the
classes better than chance while its loss is still near ``ln K``, early in
training, is not flagged: its accuracy shows it learned something.)

Detection needs the class frequencies, so it covers tasks whose training data
are in-memory ``TensorDataset`` s (or subsets of one) of integer class targets
with the plain ``F.cross_entropy`` loss (every built-in classification task);
for any other task :func:`chance_level` returns ``None`` and nothing is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from largebatch.tasks.base import Task

#: a run is at chance level when its training loss is above ``(1 - LOSS_TOLERANCE)`` times
#: the chance loss (within 1% of it, or higher) and its training accuracy at most
#: ``ACCURACY_MARGIN`` above the most frequent class's share, or when its training loss
#: is above ``WORSE_THAN_CHANCE`` times the chance loss
LOSS_TOLERANCE = 0.01
ACCURACY_MARGIN = 0.01
WORSE_THAN_CHANCE = 2.0


@dataclass(frozen=True)
class ChanceLevel:
    """What predicting the training set's class frequencies achieves on it.

    ``loss`` is their entropy in nats (the cross-entropy of that prediction),
    ``accuracy`` the share of the most frequent class.
    """

    loss: float
    accuracy: float

    def reached_by(self, train: Mapping[str, float]) -> bool:
        """Whether final training metrics ``{"loss": .., "accuracy": ..}`` are no better.

        Without an ``accuracy`` entry the loss alone decides.
        """
        loss = train["loss"]
        if not math.isfinite(loss) or loss < (1 - LOSS_TOLERANCE) * self.loss:
            return False
        if loss > WORSE_THAN_CHANCE * self.loss or "accuracy" not in train:
            return True
        return train["accuracy"] <= self.accuracy + ACCURACY_MARGIN

    def describe(self, train: Mapping[str, float]) -> str:
        """Why a run was flagged, from its final training metrics."""
        message = (
            f"training loss {train['loss']:.4f} no better than chance level {self.loss:.4f} "
            "(the loss of predicting the class frequencies)"
        )
        if "accuracy" in train:
            message += (
                f"; training accuracy {100 * train['accuracy']:.1f}% "
                f"(most frequent class: {100 * self.accuracy:.1f}%)"
            )
        return message


def _targets(dataset: Dataset) -> torch.Tensor | None:
    """The targets of an in-memory dataset (``None`` for any other kind)."""
    if isinstance(dataset, Subset):
        parent = _targets(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(dataset.indices)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1]
    return None


def chance_level(task: Task) -> ChanceLevel | None:
    """The chance level of ``task``'s training set, if defined (see the module docstring)."""
    if task.loss_fn is not F.cross_entropy:
        return None
    targets = _targets(task.train)
    if targets is None or targets.dtype not in (torch.int64, torch.int32) or targets.ndim != 1:
        return None
    counts = torch.bincount(targets.long()).double()
    frequencies = counts[counts > 0] / counts.sum()
    return ChanceLevel(
        loss=float(-(frequencies * frequencies.log()).sum()), accuracy=float(frequencies.max())
    )
