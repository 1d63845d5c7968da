"""Plumbing shared by the layer-wise optimizers (LARS, LAMB, ALTO): validation, paths, state.

An algorithm is a functional core over lists of tensors (``lars``, ``lamb``, ``alto``,
like ``torch.optim.adamw.adamw``) that dispatches each device/dtype group to one of the
:class:`Path` implementations, and a :class:`LayerwiseOptimizer` subclass that
validates hyperparameters, creates state and calls that core once per parameter group.

The switches ``foreach``, ``compiled`` and ``fused`` request a path (:func:`path_of`);
with none set, each group's path is chosen by :func:`group_paths`: the fused Triton
kernels for CUDA tensors they support, the multi-tensor path otherwise.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from largebatch.optim import _fused

COMPILE_MIN_NUMEL = 8192
"""Smallest tensor the compiled path compiles; smaller ones take the multi-tensor step.

A compiled call has a fixed cost per tensor (guards, argument handling) that exceeds
the work it saves on small tensors: biases, normalisation weights, small
convolutions. The measurement behind the value is in ``docs/optimizers.md``.
"""


class Path(enum.Enum):
    """How a step is executed."""

    SINGLE_TENSOR = "single_tensor"
    MULTI_TENSOR = "foreach"
    COMPILED = "compiled"
    FUSED = "fused"


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


def check_flag(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; expected True or False")


def path_of(foreach: bool | None, compiled: bool, fused: bool | None) -> Path | None:
    """The execution path the switches request, ``None`` for the automatic choice.

    ``ValueError`` if they clash or are not booleans (``None`` allowed for ``foreach``
    and ``fused``); ``RuntimeError`` for ``fused=True`` without Triton installed.
    """
    if compiled not in (True, False):
        raise ValueError(f"Invalid compiled value: {compiled}; expected True or False")
    if foreach not in (None, True, False):
        raise ValueError(f"Invalid foreach value: {foreach}; expected None, True or False")
    if fused not in (None, True, False):
        raise ValueError(f"Invalid fused value: {fused}; expected None, True or False")
    if fused:
        if compiled or foreach is not None:
            raise ValueError(
                f"fused=True runs the fused kernels; it cannot be combined with "
                f"{'compiled=True' if compiled else f'foreach={foreach}'}"
            )
        if not _fused.triton_available():
            raise RuntimeError(
                "fused=True needs Triton: pip install 'largebatch[triton]' "
                "(torch's CUDA wheels include it)"
            )
        return Path.FUSED
    if compiled:
        if foreach is False:
            raise ValueError(
                "compiled=True runs a multi-tensor step; it cannot be combined with foreach=False"
            )
        return Path.COMPILED
    if foreach is None and fused is None:
        return None
    return Path.SINGLE_TENSOR if foreach is False else Path.MULTI_TENSOR


def group_paths(
    requested: Path | None, groups: Sequence[Sequence[Sequence[Tensor]]]
) -> list[tuple[Path, _fused.TensorTable | None]]:
    """Each device/dtype group's path (and, for the fused path, its tensor table).

    ``requested=None`` takes the fused path for CUDA groups it supports and the
    multi-tensor path elsewhere (on CPU, the fused path runs only when requested, in
    Triton's interpreter). A requested fused path that cannot run on a group raises
    ``RuntimeError`` naming the reason; all groups are checked before any is stepped.
    """
    chosen: list[tuple[Path, _fused.TensorTable | None]] = []
    for tensor_lists in groups:
        wants_fused = requested is Path.FUSED or (
            requested is None and _fused.chosen_by_default(tensor_lists[0][0].device)
        )
        table = _fused.group_table(tensor_lists) if wants_fused else None
        if isinstance(table, str):
            if requested is Path.FUSED:
                raise RuntimeError(f"fused=True cannot run: {table}")
            table = None
        if table is not None:
            chosen.append((Path.FUSED, table))
        else:
            chosen.append((requested or Path.MULTI_TENSOR, None))
    return chosen


def device_dtype_groups(
    tensor_lists: Sequence[Sequence[Tensor]],
) -> list[list[list[Tensor]]]:
    """``tensor_lists`` split by the device and dtype of the first list's tensors."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [list(tensors) for tensors in tensor_lists]
    )
    return [lists for lists, _ in grouped.values()]


def small_and_large(params: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the tensors below :data:`COMPILE_MIN_NUMEL` elements, and of the others.

    The compiled path gives the small ones to the multi-tensor step.
    """
    small = [i for i, p in enumerate(params) if p.numel() < COMPILE_MIN_NUMEL]
    large = [i for i, p in enumerate(params) if p.numel() >= COMPILE_MIN_NUMEL]
    return small, large


def check_dense_gradients(name: str, params: Iterable[Tensor]) -> None:
    """``RuntimeError`` if any gradient is sparse; call before changing anything."""
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise RuntimeError(f"{name} does not support sparse gradients")


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of LARS, LAMB and ALTO: validated groups, state, and one functional call per group.

    A subclass names its per-parameter buffers (:attr:`state_buffers`, in the order its
    functional core takes them, then the step counts if :attr:`counts_steps`), its core
    (:attr:`functional`), the core's hyperparameters for a group
    (:meth:`_hyperparameters`) and its checks (:meth:`_check_hyperparameters`, raising
    ``ValueError`` naming the bad value). Every group also holds ``lr``, ``trust_ratio``,
    ``maximize``, ``foreach``, ``compiled`` and ``fused``.
    """

    state_buffers: ClassVar[tuple[str, ...]]
    counts_steps: ClassVar[bool]
    functional: ClassVar[Callable[..., None]]

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        hyperparameters: dict[str, Any],
        *,
        trust_ratio: bool,
        maximize: bool,
        foreach: bool | None,
        compiled: bool,
        fused: bool | None,
    ) -> None:
        defaults = {
            **hyperparameters,
            "trust_ratio": trust_ratio,
            "maximize": maximize,
            "foreach": foreach,
            "compiled": compiled,
            "fused": fused,
        }
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        check_flag("trust_ratio", group["trust_ratio"])
        check_flag("maximize", group["maximize"])
        path_of(group["foreach"], group["compiled"], group["fused"])
        self._check_hyperparameters(group)

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The functional core's algorithm-specific keyword arguments for ``group``."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters (its overrides included)."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Groups saved before the ``maximize``/``overwrite_grad``/``fused`` switches get the defaults."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("maximize", "overwrite_grad"):
                if key in self.defaults:
                    group.setdefault(key, False)
            group.setdefault("fused", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; step counts follow their parameter's device (no host syncs later)."""
        super().load_state_dict(state_dict)
        for param, param_state in self.state.items():
            if "step" in param_state:
                param_state["step"] = param_state["step"].to(param.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; returns the closure's loss if a closure is given.

        A sparse gradient raises ``RuntimeError`` before any parameter or state changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_dense_gradients(
            type(self).__name__, (p for group in self.param_groups for p in group["params"])
        )
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                type(self).functional(
                    params,
                    [p.grad for p in params],
                    *self._state_lists(params),
                    lr=group["lr"],
                    trust_ratio=group["trust_ratio"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                    compiled=group["compiled"],
                    fused=group["fused"],
                    **self._hyperparameters(group),
                )
        return loss

    def _state_lists(self, params: list[Tensor]) -> list[list[Tensor]]:
        """Each buffer of :attr:`state_buffers` for ``params`` (created as zeros), then step counts."""
        for p in params:
            state = self.state[p]
            if not state:
                if self.counts_steps:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in self.state_buffers:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        keys = self.state_buffers + (("step",) if self.counts_steps else ())
        return [[self.state[p][key] for p in params] for key in keys]
