"""The grafted optimizers: each block's step norm comes from one of these, the direction from Shampoo.

A grafting rule turns ``x``, the momentum (or the gradient when there is no momentum), into
the grafted optimizer's update ``D = -lr * c * x / (...)``, with ``c`` the momentum's bias
correction; Shampoo's preconditioned direction ``P`` is then rescaled to
``||D||_F / ||P||_F * P`` per block. Before ``start_preconditioning_step``, and for
parameters that are not preconditioned, ``D`` is the update. Rules act on the contiguous
segments of a partition's flat buffers (see :mod:`.layout`) and write into one of them, so
all of a group's blocks and parameters are handled in a few kernels without temporaries;
only per-unit scalars (parameters whose step counts differ) need one tensor per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.optim.shampoo.config import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    GraftingConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)
from largebatch.optim.shampoo.scalars import PerUnit, UnitViews, add_, mul_

SECOND_MOMENT = "graft_second_moment"


@dataclass(frozen=True)
class GraftingRule:
    """A grafted optimizer's update: ``D = scale * x / (sqrt(v) + epsilon)``, or ``scale * x`` (SGD).

    ``v`` is a sum (AdaGrad) or an EMA (RMSprop, Adam) of ``g**2``. Adam's bias correction ``sqrt(v / c) = sqrt(v) / sqrt(c)`` is folded into ``scale`` and
    ``epsilon`` (both multiplied by ``sqrt(c)``, see :meth:`correction`), so it costs no pass
    of its own.
    """

    second_moment: bool
    beta2: float | None = None  # None: a running sum (AdaGrad)
    epsilon: float = 0.0
    bias_correction: bool = False

    @property
    def state_keys(self) -> tuple[str, ...]:
        return (SECOND_MOMENT,) if self.second_moment else ()

    def correction(self, step: int) -> float:
        """The factor ``sqrt(1 - beta2^step)`` folded into the scale and epsilon (1: none)."""
        return math.sqrt(1.0 - self.beta2**step) if self.bias_correction else 1.0

    def accumulate(self, states: dict[str, list[Tensor]], grads: list[Tensor]) -> None:
        """Fold this step's gradients (segments) into the grafting state (segments)."""
        if not self.second_moment:
            return
        second_moments = states[SECOND_MOMENT]
        if self.beta2 is None:
            torch._foreach_addcmul_(second_moments, grads, grads)
        else:
            torch._foreach_mul_(second_moments, self.beta2)
            torch._foreach_addcmul_(second_moments, grads, grads, value=1.0 - self.beta2)

    def direction(
        self,
        xs: list[Tensor],
        states: dict[str, list[Tensor]],
        out: list[Tensor],
        scale: PerUnit,
        epsilon: PerUnit,
        units: UnitViews,
    ) -> None:
        """Write the grafted update for the inputs ``xs`` into ``out`` (segments all three)."""
        if not self.second_moment and not isinstance(scale, list):
            for x, d in zip(xs, out):  # SGD: one pass, the scaled copy
                torch.mul(x, scale, out=d)
            return
        if self.second_moment:
            for v, d in zip(states[SECOND_MOMENT], out):
                torch.sqrt(v, out=d)
            add_(out, epsilon, units)
            for x, d in zip(xs, out):
                torch.div(x, d, out=d)
        else:
            torch._foreach_copy_(out, xs)
        mul_(out, scale, units)


def make_grafting(config: GraftingConfig) -> GraftingRule:
    """The rule implementing a grafting config."""
    if isinstance(config, AdamGraftingConfig):  # before RMSprop, its base class
        return GraftingRule(True, config.beta2, config.epsilon, bias_correction=True)
    if isinstance(config, RMSpropGraftingConfig):
        return GraftingRule(True, config.beta2, config.epsilon)
    if isinstance(config, AdaGradGraftingConfig):
        return GraftingRule(True, None, config.epsilon)
    if isinstance(config, SGDGraftingConfig):
        return GraftingRule(False)
    raise ValueError(f"Invalid grafting: {config!r}")
