"""Teacher-student classification: a random network labels Gaussian inputs.

The teacher is a one-hidden-layer tanh network with Gaussian weights; an input's
label is the arg-max of the teacher's outputs (tanh is odd, so no class is
favoured on average). ``label_noise`` replaces that fraction of the training
labels (and so of the validation labels, carved from training) with uniformly
random classes; test labels stay clean, so test accuracy measures how well the
student recovers the teacher. The student is a ReLU MLP.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.nn import functional as F

from largebatch.tasks.base import Task
from largebatch.tasks.data import (
    check_fraction,
    check_num_classes,
    check_positive_ints,
    check_seed,
    classification_task,
    tensor_dataset,
)
from largebatch.tasks.models import mlp


def teacher_labels(
    inputs: torch.Tensor, teacher_hidden: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Arg-max labels of a random tanh teacher with Gaussian weights.

    Output weight columns have unit norm so no class gets a larger logit scale
    and classes come out roughly balanced.
    """
    w1 = torch.randn(inputs.shape[1], teacher_hidden, generator=generator) / math.sqrt(
        inputs.shape[1]
    )
    w2 = F.normalize(torch.randn(teacher_hidden, num_classes, generator=generator), dim=0)
    return (torch.tanh(inputs @ w1) @ w2).argmax(dim=1)


def teacher_student(
    num_train: int = 8_000,
    num_test: int = 2_000,
    input_dim: int = 20,
    num_classes: int = 10,
    teacher_hidden: int = 16,
    student_hidden: int = 128,
    label_noise: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Gaussian inputs, random-teacher labels (optionally noisy), a two-hidden-layer student MLP."""
    check_positive_ints(
        num_train=num_train, num_test=num_test, input_dim=input_dim,
        teacher_hidden=teacher_hidden, student_hidden=student_hidden,
    )  # fmt: skip
    check_num_classes(num_classes)
    check_fraction("label_noise", label_noise, allow_zero=True)
    check_seed(seed)

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_train + num_test, input_dim, generator=generator)
    labels = teacher_labels(inputs, teacher_hidden, num_classes, generator)
    train_labels = labels[:num_train].clone()
    noisy = torch.rand(num_train, generator=generator) < label_noise
    random_labels = torch.randint(num_classes, (num_train,), generator=generator)
    train_labels[noisy] = random_labels[noisy]

    return classification_task(
        "teacher-student",
        train=tensor_dataset(inputs[:num_train], train_labels),
        test=tensor_dataset(inputs[num_train:], labels[num_train:]),
        build_model=partial(mlp, input_dim, [student_hidden, student_hidden], num_classes),
        target_accuracy=0.8,
        val_fraction=val_fraction,
        val_seed=seed,
    )
