"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped with the package).

Pixel intensities 0-16 are scaled to [0, 1]; inputs are ``(n, 1, 8, 8)`` float32.
The test split is stratified by class, so every digit appears in both splits.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from largebatch.tasks.base import Task
from largebatch.tasks.data import (
    check_fraction,
    check_positive_int,
    check_seed,
    classification_task,
    tensor_dataset,
)

NUM_CLASSES = 10
MAX_PIXEL = 16.0


def digits_cnn_model(channels: int = 16, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """Two 3x3 convolutions, one 2x2 max-pool, a linear read-out (8x8 -> 4x4)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, num_classes),
    )


def digits_cnn(
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    channels: int = 16,
) -> Task:
    """The 8x8 digits with a small 2-D CNN."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_fraction("test_fraction", test_fraction)
    check_seed(seed)
    check_positive_int("channels", channels)
    digits = load_digits()
    images = (digits.images / MAX_PIXEL).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return classification_task(
        "digits-cnn",
        train=tensor_dataset(x_train, y_train),
        test=tensor_dataset(x_test, y_test),
        build_model=lambda: digits_cnn_model(channels),
        target_accuracy=0.95,
        val_fraction=val_fraction,
        val_seed=seed,
    )
