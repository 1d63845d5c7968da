"""The grafted optimizers: each block's step norm comes from one of these, the direction from Shampoo.

A grafting rule turns ``scale * x``, the bias-corrected momentum (or the gradient when there
is no momentum), into the grafted optimizer's step ``D``; Shampoo's preconditioned direction ``P`` is then rescaled to
``||D||_F / ||P||_F * P`` per block. Before ``start_preconditioning_step``, and for parameters
that are not preconditioned, ``D`` is the step. Rules act on lists of tensors with
``torch._foreach_*`` so all of a group's blocks and parameters are handled in a few kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from largebatch.optim.shampoo.config import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    GraftingConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)

SECOND_MOMENT = "graft_second_moment"


class SGDGrafting:
    """``D = x``: no state."""

    state_keys: tuple[str, ...] = ()

    def accumulate(self, states: dict[str, list[Tensor]], grads: list[Tensor]) -> None:
        """Fold this step's gradients into the grafting state."""

    def direction(
        self, xs: list[Tensor], scale: float, states: dict[str, list[Tensor]], step: int
    ) -> list[Tensor]:
        """The grafted step for inputs ``scale * xs`` (new tensors)."""
        return torch._foreach_mul(xs, scale)


class _DiagonalGrafting:
    """``D = x / (sqrt(v / bias_correction) + epsilon)`` with ``v`` a sum or an EMA of ``g**2``."""

    state_keys: tuple[str, ...] = (SECOND_MOMENT,)

    def __init__(self, beta2: float | None, epsilon: float, bias_correction: bool) -> None:
        self.beta2 = beta2  # None: running sum (AdaGrad)
        self.epsilon = epsilon
        self.bias_correction = bias_correction

    def accumulate(self, states: dict[str, list[Tensor]], grads: list[Tensor]) -> None:
        second_moments = states[SECOND_MOMENT]
        if self.beta2 is None:
            torch._foreach_addcmul_(second_moments, grads, grads)
        else:
            torch._foreach_mul_(second_moments, self.beta2)
            torch._foreach_addcmul_(second_moments, grads, grads, value=1.0 - self.beta2)

    def direction(
        self, xs: list[Tensor], scale: float, states: dict[str, list[Tensor]], step: int
    ) -> list[Tensor]:
        # scale * x / (sqrt(v / c) + eps) as (scale * sqrt(c)) * x / (sqrt(v) + eps * sqrt(c)):
        # the corrections cost no pass of their own.
        root_correction = math.sqrt(1.0 - self.beta2**step) if self.bias_correction else 1.0
        denominators = torch._foreach_sqrt(states[SECOND_MOMENT])
        torch._foreach_add_(denominators, self.epsilon * root_correction)
        directions = torch._foreach_div(xs, denominators)
        if scale * root_correction != 1.0:
            torch._foreach_mul_(directions, scale * root_correction)
        return directions


GraftingRule = SGDGrafting | _DiagonalGrafting


def make_grafting(config: GraftingConfig) -> GraftingRule:
    """The rule implementing a grafting config."""
    if isinstance(config, AdamGraftingConfig):
        return _DiagonalGrafting(config.beta2, config.epsilon, bias_correction=True)
    if isinstance(config, RMSpropGraftingConfig):
        return _DiagonalGrafting(config.beta2, config.epsilon, bias_correction=False)
    if isinstance(config, AdaGradGraftingConfig):
        return _DiagonalGrafting(None, config.epsilon, bias_correction=False)
    if isinstance(config, SGDGraftingConfig):
        return SGDGrafting()
    raise ValueError(f"Invalid grafting: {config!r}")
