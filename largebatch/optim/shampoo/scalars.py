"""The per-step scalars of Shampoo's element-wise arithmetic, and the list operations that take them.

A scalar is a Python number in an eager step, or a 0-dim tensor on the device when the step
is replayed as a CUDA graph (the graph then reads the value written before each replay
instead of the one baked in at capture). A per-unit scalar is, in addition, a list of
numbers, one per active unit (block or unblocked parameter), when the parameters of a
partition have taken different numbers of steps (a parameter that joined late); the
operations then run over the units' views rather than over whole segments (the
contiguous runs of active units in a flat buffer, see :mod:`.layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

Scalar = float | Tensor
PerUnit = Scalar | list[float]
UnitViews = Callable[[], list[Tensor]]
"""The active units' views of the segments an operation works on (for per-unit scalars)."""


def mul_(segments: list[Tensor], value: PerUnit, units: UnitViews) -> None:
    if isinstance(value, list):
        torch._foreach_mul_(units(), value)
    else:
        torch._foreach_mul_(segments, value)


def add_(segments: list[Tensor], value: PerUnit, units: UnitViews) -> None:
    if isinstance(value, list):
        torch._foreach_add_(units(), value)
    else:
        torch._foreach_add_(segments, value)


def lerp_(tensors: list[Tensor], ends: list[Tensor], weight: Scalar) -> None:
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(tensors, ends, [weight] * len(tensors))
    else:
        torch._foreach_lerp_(tensors, ends, weight)


@dataclass(frozen=True)
class StepScalars:
    """What one step of a partition multiplies by.

    Attributes:
        momentum_weight: ``1 - beta1``, the momentum EMA's weight on the gradient.
        nesterov_weight: ``beta1``, the look-ahead's weight on the momentum.
        graft_scale: ``-lr * c1 * c2``: the grafted update's factor, with ``c1`` the
            momentum's bias correction ``1 / (1 - beta1^t)`` (``t + 1`` with Nesterov) and
            ``c2`` the grafting rule's correction (Adam: ``sqrt(1 - beta2^t)``).
        graft_epsilon: the grafting rule's epsilon times ``c2``.
        decay: ``1 - lr * weight_decay``.
    """

    momentum_weight: Scalar
    nesterov_weight: Scalar
    graft_scale: PerUnit
    graft_epsilon: PerUnit
    decay: Scalar

    @classmethod
    def for_steps(
        cls,
        group: dict,
        correction: Callable[[int], float],
        epsilon: float,
        steps: list[int],
    ) -> StepScalars:
        """The scalars for active units that have taken ``steps`` steps (one per unit)."""
        beta1 = group["betas"][0]
        lr = group["lr"]
        lookahead = 1 if group["nesterov"] else 0

        def scale_and_epsilon(step: int) -> tuple[float, float]:
            momentum_correction = 1.0 if beta1 == 0.0 else 1.0 - beta1 ** (step + lookahead)
            c2 = correction(step)
            return -lr * c2 / momentum_correction, epsilon * c2

        first = steps[0] if steps else 1
        if all(step == first for step in steps):
            scale, eps = scale_and_epsilon(first)
        else:
            pairs = [scale_and_epsilon(step) for step in steps]
            scale, eps = [p[0] for p in pairs], [p[1] for p in pairs]
        return cls(
            momentum_weight=1.0 - beta1,
            nesterov_weight=beta1,
            graft_scale=scale,
            graft_epsilon=eps,
            decay=1.0 - lr * group["weight_decay"],
        )

    @property
    def uniform(self) -> bool:
        """Whether every unit shares the same scalars (needed to replay a CUDA graph)."""
        return not isinstance(self.graft_scale, list)

    def values(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def views_of(cls, tensor: Tensor) -> StepScalars:
        """Scalars read from a device tensor holding :meth:`values` (what a CUDA graph captures)."""
        return cls(*tensor.unbind())
