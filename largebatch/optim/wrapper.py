"""The machinery shared by optimizers that wrap a base ``torch.optim.Optimizer``.

A wrapper (the E adaptor, the extrapolation family) changes what the base steps on,
not how it steps. :class:`OptimizerWrapper` holds the plumbing once: it shares the
base's parameter group dicts (so an LR scheduler on either object drives both),
nests the base's ``state_dict`` under ``base_optimizer``, delegates ``zero_grad``,
keeps the base on pickle/deepcopy, and forwards the base's ``step_protocol``.
Subclasses add their hyperparameters (``defaults``), a group check and ``step``.
"""

from __future__ import annotations

from typing import Any

import torch

from largebatch.optim.protocol import StepProtocol, step_protocol_of


class OptimizerWrapper(torch.optim.Optimizer):
    """Base class of optimizers that wrap ``base_optimizer`` and share its groups.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``.
        defaults: the wrapper's own hyperparameters (validated by :meth:`_check_group`);
            groups lacking a key get it. Name them apart from the base's keys.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, defaults: dict[str, Any]) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid base optimizer: a {type(base_optimizer).__name__}; "
                f"{type(self).__name__} wraps a torch.optim.Optimizer"
            )
        self._check_group(defaults)
        self.base_optimizer = base_optimizer
        # Shares the base's group dicts (not its list, see add_param_group).
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults, **defaults})

    @property
    def step_protocol(self) -> StepProtocol:
        """The base optimizer's protocol (subclasses that evaluate gradients override it)."""
        return step_protocol_of(self.base_optimizer)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad hyperparameter of ``group`` (defaults filled in)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (unless it is one of its groups already) and here."""
        self._check_group({**self.defaults, **param_group})
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
            param_group = self.base_optimizer.param_groups[-1]
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (delegates to the base optimizer)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deepcopy keep every attribute but hooks (``Optimizer`` keeps only its own)."""
        return {key: value for key, value in self.__dict__.items() if not key.endswith("_hooks")}

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state and groups, plus the base's under ``base_optimizer``."""
        state_dict = super().state_dict()
        state_dict["base_optimizer"] = self.base_optimizer.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapper's and the base's state; the group dicts stay shared with the base."""
        own = dict(state_dict)
        if "base_optimizer" not in own:
            raise ValueError(
                "Invalid state_dict: no 'base_optimizer' entry "
                f"(it was not saved by {type(self).__name__})"
            )
        self.base_optimizer.load_state_dict(own.pop("base_optimizer"))
        super().load_state_dict(own)
        self.param_groups = list(self.base_optimizer.param_groups)
