"""MNIST-1D: ten 1-D digit templates, randomly padded, scaled, sheared, translated and noised.

Data come from the ``mnist1d`` package's generator (``make_dataset``; its
downloader is never used), cached on disk after the first generation. Inputs are
length-40 signals, ``(n, 40)`` float32; the CNN adds the channel dimension itself,
so both models share one data set.
"""

from __future__ import annotations

import importlib.metadata
import random
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from largebatch.tasks.base import Task
from largebatch.tasks.cache import Arrays, cached
from largebatch.tasks.data import (
    check_fraction,
    check_positive_int,
    check_seed,
    classification_task,
    tensor_dataset,
)
from largebatch.tasks.models import mlp
from largebatch.utils.errors import ConfigError

NUM_CLASSES = 10
SIGNAL_LENGTH = 40  # mnist1d's default final_seq_length


def generation_key(num_samples: int, test_fraction: float, seed: int) -> dict:
    """What identifies a generated data set: our arguments and the generator's version.

    mnist1d's other generation arguments are its defaults, fixed by its version, so
    the key needs no import of mnist1d (slow: it pulls in matplotlib); a cache hit
    stays fast.
    """
    return {
        "num_samples": num_samples,
        "train_split": 1 - test_fraction,
        "seed": seed,
        "mnist1d_version": importlib.metadata.version("mnist1d"),
    }


def _generate(key: dict) -> Arrays:
    """Run mnist1d's generator without disturbing the global ``random``/NumPy RNG state.

    ``make_dataset`` reseeds both global generators; restoring them keeps a
    training run's randomness the same whether the data came from the cache or not.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = (
        key["num_samples"],
        key["train_split"],
        key["seed"],
    )
    # the legacy global state is what make_dataset reseeds
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


class MNIST1DConvNet(nn.Module):
    """Three strided 1-D convolutions and a linear read-out (about 5k parameters).

    The architecture of the MNIST-1D paper's CNN: 40 -> 19 -> 10 -> 5 positions
    with ``channels`` channels each, ReLU between layers.
    """

    def __init__(self, channels: int = 25, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.readout = nn.Linear(channels * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.unsqueeze(1)))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.readout(h.flatten(1))


def _mnist1d_task(
    name: str,
    build_model,
    target_accuracy: float,
    num_samples: int,
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> Task:
    """Generate (or load) the data and wrap them with ``build_model``."""
    check_positive_int("num_samples", num_samples)
    if num_samples < 2 * NUM_CLASSES:
        raise ConfigError(
            f"Invalid num_samples: {num_samples} (expected at least {2 * NUM_CLASSES})"
        )
    check_fraction("test_fraction", test_fraction)
    check_fraction("val_fraction", val_fraction, allow_zero=True)  # before the slow generation
    check_seed(seed)
    key = generation_key(num_samples, test_fraction, seed)
    data = cached("mnist1d", key, partial(_generate, key))
    return classification_task(
        name,
        train=tensor_dataset(data["x"], data["y"]),
        test=tensor_dataset(data["x_test"], data["y_test"]),
        build_model=build_model,
        target_accuracy=target_accuracy,
        val_fraction=val_fraction,
        val_seed=seed,
    )


def mnist1d_cnn(
    num_samples: int = 12_000,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 42,
    channels: int = 25,
) -> Task:
    """MNIST-1D with the paper's three-layer 1-D CNN (the default task)."""
    check_positive_int("channels", channels)
    return _mnist1d_task(
        "mnist1d-cnn",
        partial(MNIST1DConvNet, channels),
        0.95,
        num_samples,
        test_fraction,
        val_fraction,
        seed,
    )


def mnist1d_mlp(
    num_samples: int = 12_000,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 42,
    hidden: int = 100,
) -> Task:
    """MNIST-1D with a two-hidden-layer ReLU MLP."""
    check_positive_int("hidden", hidden)
    return _mnist1d_task(
        "mnist1d-mlp",
        partial(mlp, SIGNAL_LENGTH, [hidden, hidden], NUM_CLASSES),
        0.7,
        num_samples,
        test_fraction,
        val_fraction,
        seed,
    )
