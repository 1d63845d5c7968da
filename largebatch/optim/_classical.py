"""Plumbing shared by the classical methods (SVRG, SAGA, Newton-CG, oLBFGS, SQN).

:class:`ClassicalOptimizer` validates every parameter group (per-group overrides
included) with the subclass's :meth:`~ClassicalOptimizer._check_group` and keeps
the last step's statistics for :meth:`~ClassicalOptimizer.step_statistics`
(see :mod:`largebatch.optim.classical_protocol`). The checks raise
``ValueError`` naming the bad value, in ``torch.optim``'s wording.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_positive(name: str, value: float) -> None:
    """``ValueError`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name} value: {value} (expected > 0)")


def check_open_unit(name: str, value: float) -> None:
    """``ValueError`` unless ``0 < value < 1``."""
    if not (isinstance(value, int | float) and 0.0 < value < 1.0):
        raise ValueError(f"Invalid {name} value: {value} (expected 0 < {name} < 1)")


def check_positive_int(name: str, value: int) -> None:
    """``ValueError`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value} (expected an integer >= 1)")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name} value: {value!r} (expected one of {choices})")


def reject_meta(param_group: dict[str, Any], what: str) -> dict[str, Any]:
    """``param_group`` with its parameters listed; ``ValueError`` if one is a ``meta`` tensor.

    For methods whose control flow reads values (line searches, CG's exit tests):
    meta tensors have none, so the optimizer says so when it is built.
    """
    params = param_group["params"]
    if isinstance(params, set):  # torch.optim rejects an unordered collection itself
        return param_group
    params = [params] if isinstance(params, Tensor) else list(params)
    if any(isinstance(p, Tensor) and p.is_meta for p in params):
        raise ValueError(
            f"Invalid params: meta tensors ({what} decides on values, which meta tensors "
            "do not have)"
        )
    return {**param_group, "params": params}


class ClassicalOptimizer(torch.optim.Optimizer):
    """Base of the classical methods: validated groups and per-step statistics.

    Subclasses set ``STATISTICS`` (the names :meth:`step_statistics` returns),
    ``GLOBAL_KEYS`` (hyperparameters of the whole optimizer, which every group
    must share: one solve or one snapshot covers all groups) and implement
    :meth:`_check_group`. The last step's statistics are part of the state
    (``state["statistics"]``), so a resumed run reports what the uninterrupted
    one would (SVRG's snapshot values persist between snapshots).
    """

    STATISTICS: tuple[str, ...] = ()
    GLOBAL_KEYS: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict) -> None:
        self._check_group(defaults)
        super().__init__(params, defaults)

    @property
    def _statistics(self) -> dict[str, Any]:
        return self.state["statistics"]

    @_statistics.setter
    def _statistics(self, values: dict[str, Any]) -> None:
        self.state["statistics"] = values

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad hyperparameter of ``group`` (defaults filled in)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters (its overrides included)."""
        group = {**self.defaults, **param_group}
        self._check_group(group)
        if self.param_groups:
            first = self.param_groups[0]
            for key in self.GLOBAL_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"Invalid {key} value: {group[key]!r} in group {len(self.param_groups)}; "
                        f"{type(self).__name__} needs the same {key} in every group ({first[key]!r})"
                    )
        super().add_param_group(param_group)

    def step_statistics(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """The last step's quantities, one float per name in ``STATISTICS`` (NaN before any).

        Steps keep them as they come (device tensors included, so a step never waits
        for the device); they are read here. ``names`` picks a subset.
        """
        names = self.STATISTICS if names is None else tuple(names)
        return {name: float(self._statistics.get(name, math.nan)) for name in names}
