"""A user task module, as a user would write it, for ``get_task("example_user_task:build")``."""

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from largebatch.tasks import Task

NOT_A_FUNCTION = 42


def build(num_examples: int = 64, dim: int = 3) -> Task:
    """Two Gaussian blobs, a linear model."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(num_examples) % 2
    inputs = torch.randn(num_examples, dim, generator=generator) + targets[:, None].float()
    data = TensorDataset(inputs, targets)
    return Task(
        name="example_user_task:build",
        train=data,
        test=data,
        build_model=lambda: nn.Linear(dim, 2),
        loss_fn=F.cross_entropy,
    )


def returns_wrong_type() -> dict:
    return {"train": None}
