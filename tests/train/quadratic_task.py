"""A noisy quadratic with known curvature and gradient variance, as a largebatch task.

Example ``i`` is a point ``xi_i`` in R^d; its loss at parameters ``w`` is
``0.5 sum_j h_j (w_j - xi_ij)^2``. Every batch has the same Hessian ``diag(h)``,
so gradient descent is stable exactly for ``lr < 2 / max(h)`` (heavy ball with
momentum ``beta``: ``lr < 2 (1 + beta) / max(h)``); the per-example gradient
``h * (w - xi_i)`` has covariance trace ``sum_j h_j^2 var_j(xi)`` and the true
gradient is ``h * (w - mean(xi))``. Importable as ``quadratic_task:build``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from largebatch.tasks import Task


class Point(nn.Module):
    """The parameters ``w`` (zeros at the start); ``forward(xi) = w - xi``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.w - inputs


def curvatures(dim: int, top: float) -> torch.Tensor:
    """``h``: from ``top`` down to ``top / 10``, geometrically."""
    return top * torch.logspace(0, -1, dim)


def build(
    dim: int = 3,
    top: float = 4.0,
    mean: float = 1.0,
    noise: float = 1.0,
    num_train: int = 4096,
    seed: int = 0,
    nan_inputs: bool = False,
) -> Task:
    """Points ``xi ~ N(mean, noise^2)`` per coordinate; curvatures :func:`curvatures`."""
    generator = torch.Generator().manual_seed(seed)
    h = curvatures(dim, top)
    points = mean + noise * torch.randn(num_train + 256, dim, generator=generator)
    if nan_inputs:
        points[:, 0] = float("nan")

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (h * outputs**2).sum(dim=1).mean()

    unused = torch.zeros(num_train + 256)
    return Task(
        name="quadratic_task:build",
        train=TensorDataset(points[:num_train], unused[:num_train]),
        test=TensorDataset(points[num_train:], unused[num_train:]),
        build_model=lambda: Point(dim),
        loss_fn=loss_fn,
        metrics={},
    )
