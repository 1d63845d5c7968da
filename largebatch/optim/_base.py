"""Plumbing shared by the layer-wise optimizers (LARS, LAMB, ALTO): validation, paths, state.

Each algorithm provides its math three ways that :func:`run_step` dispatches to:
a per-tensor step (the single-tensor path, and what the compiled path traces),
a multi-tensor ``torch._foreach_*`` step, and a :class:`CompiledStep` of the
per-tensor step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._compiled import CompiledStep, select_entries

COMPILE_MIN_NUMEL = 8192
"""Smallest tensor the compiled path compiles; smaller ones take the multi-tensor step.

A compiled call costs about 25 us per tensor on CPU before any work, the
multi-tensor LAMB step about 10 us plus 3 ns per element: they cross near 8K
elements (ResNet-50: the 107 biases and norm weights, and 3 small convolutions).
"""


class Path(enum.Enum):
    """How a step is executed."""

    SINGLE_TENSOR = "single_tensor"
    MULTI_TENSOR = "foreach"
    COMPILED = "compiled"


def check_lr(lr: float) -> None:
    """``ValueError`` unless ``lr`` is a finite non-negative float."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_non_negative(name: str, value: float) -> None:
    """``ValueError`` unless ``value`` is a finite float >= 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name} value: {value}")


def check_betas(betas: Sequence[float], count: int) -> None:
    """``ValueError`` unless ``betas`` holds ``count`` values in [0, 1)."""
    if len(betas) != count:
        raise ValueError(f"Invalid betas: {betas}; expected {count} values")
    for index, beta in enumerate(betas):
        if not (isinstance(beta, int | float) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")


def path_of(foreach: bool | None, compiled: bool) -> Path:
    """The execution path for the ``foreach``/``compiled`` switches (``ValueError`` if they clash)."""
    if compiled not in (True, False):
        raise ValueError(f"Invalid compiled value: {compiled}; expected True or False")
    if foreach not in (None, True, False):
        raise ValueError(f"Invalid foreach value: {foreach}; expected None, True or False")
    if compiled:
        if foreach is False:
            raise ValueError(
                "compiled=True runs a multi-tensor step; it cannot be combined with foreach=False"
            )
        return Path.COMPILED
    return Path.SINGLE_TENSOR if foreach is False else Path.MULTI_TENSOR


def run_step(
    path: Path,
    *,
    tensor_step: Callable[..., None],
    multi_tensor_step: Callable[..., None],
    compiled_step: CompiledStep,
    tensor_lists: Sequence[list[Tensor]],
    scalar_lists: Sequence[Sequence[Tensor]] = (),
    hyperparameters: Mapping[str, float],
    options: Mapping[str, Any],
) -> None:
    """Run one group's step (tensors on one device, one dtype) on ``path``.

    On the compiled path, tensors of fewer than :data:`COMPILE_MIN_NUMEL` elements
    take the multi-tensor step: for them a compiled call's fixed cost (guards,
    argument handling) exceeds the work it saves.
    """
    if path is Path.COMPILED:
        small = [i for i, p in enumerate(tensor_lists[0]) if p.numel() < COMPILE_MIN_NUMEL]
        if small:
            multi_tensor_step(
                *select_entries(tensor_lists, small),
                *select_entries(scalar_lists, small),
                **hyperparameters,
                **options,
            )
            large = [i for i, p in enumerate(tensor_lists[0]) if p.numel() >= COMPILE_MIN_NUMEL]
            tensor_lists = select_entries(tensor_lists, large)
            scalar_lists = select_entries(scalar_lists, large)
        if tensor_lists[0]:
            compiled_step(
                tensor_lists,
                scalar_lists=scalar_lists,
                hyperparameters=hyperparameters,
                options=options,
            )
    elif path is Path.MULTI_TENSOR:
        multi_tensor_step(*tensor_lists, *scalar_lists, **hyperparameters, **options)
    elif compiled_step.direction_into_grad:
        # The reference path keeps p.grad: the direction goes into a copy of it.
        for param, grad, *rest in zip(*tensor_lists, *scalar_lists):
            direction = grad.clone()
            coefficient = tensor_step(param, direction, *rest, **hyperparameters, **options)
            param.add_(coefficient * direction)
    else:
        for tensors in zip(*tensor_lists, *scalar_lists):
            tensor_step(*tensors, **hyperparameters, **options)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of LARS, LAMB and ALTO: validated groups, closure handling, step counts on device.

    Subclasses implement :meth:`_check_group` (raise ``ValueError`` naming the bad
    value) and :meth:`_step_group`.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]
    ):
        self._check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters (its overrides included)."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; step counts follow their parameter's device (no host syncs later)."""
        super().load_state_dict(state_dict)
        for param, param_state in self.state.items():
            if "step" in param_state:
                param_state["step"] = param_state["step"].to(param.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _params_with_grad(self, group: Mapping[str, Any]) -> list[Tensor]:
        """The group's parameters that have a (dense) gradient."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return params
