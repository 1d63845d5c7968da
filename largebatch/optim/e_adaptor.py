"""The E adaptor (Zhao et al., NeurIPS 2025): any optimizer, fed an extrapolated gradient.

``E(base, alpha, beta1)`` keeps one buffer per parameter, the EMA ``mu`` of the raw
gradients, and lets ``base`` step on ``ghat = (1 + c) g - c mu_prev`` with
``c = alpha (1 - beta1)`` (the paper's ``g + alpha * a``, ``a`` the EMA of gradient
differences; see :mod:`largebatch.optim.transforms`). Negative ``alpha`` (large
batches) pulls each gradient toward the long-memory average; positive ``alpha``
(small batches) extrapolates it.

E is linear in the gradient, so a base with ``maximize=True`` maximizes as it would
without E. Unlike the reference code (``e-optimizer-adaptor`` 0.1.0), ``p.grad`` holds the
caller's gradient again after ``step()``, the adaptor's buffers are part of
``state_dict``, and ``alpha``/``beta1`` live in the parameter groups (as
``e_alpha``/``e_beta1``, prefixed so they never collide with a base key such as
RMSprop's ``alpha``) where schedulers and per-group settings can reach them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_dense_gradients
from largebatch.optim.transforms import check_e_hyperparameters, e_gradients_
from largebatch.optim.wrapper import OptimizerWrapper


class E(OptimizerWrapper):
    """Wrap ``base_optimizer`` so that it steps on E-transformed gradients.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; the adaptor shares its
            parameter groups (the same dicts), so an LR scheduler on either object
            drives both.
        alpha: exploration (< 0) or exploitation (> 0) strength; ``|alpha| <=
            1 / (1 - beta1)``. Default -5 is the paper's large-batch (>= 1K) value.
        beta1: EMA factor of the gradient differences, in [0, 1). Default 0.99
            (large batch). The paper's small-batch setting is ``alpha=0.5, beta1=0.01``.

    A group may set its own ``e_alpha``/``e_beta1`` keys (e.g. in the dicts given to
    the base optimizer); groups without them get ``alpha``/``beta1``.
    """

    def __init__(
        self, base_optimizer: torch.optim.Optimizer, alpha: float = -5.0, beta1: float = 0.99
    ) -> None:
        super().__init__(base_optimizer, {"e_alpha": alpha, "e_beta1": beta1})

    def _check_group(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming an invalid ``e_alpha``/``e_beta1``."""
        check_e_hyperparameters(group["e_alpha"], group["e_beta1"])

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The group's parameters with a gradient, their gradients and their ``grad_ema`` buffers."""
        params, grads, grad_emas, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["grad_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            grad_emas.append(state["grad_ema"])
            steps.append(state["step"])
        if steps:
            torch._foreach_add_(steps, 1.0)
        return params, grads, grad_emas

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Let the base optimizer step on E-transformed gradients; ``p.grad`` is unchanged after.

        With a closure and a base that takes none, the closure is evaluated first
        (loss and gradients) as in ``torch.optim``. A base whose step protocol
        needs a closure receives it; E then transforms the gradient present
        before ``step``. A sparse gradient raises ``RuntimeError`` before anything
        changes.
        """
        loss = None
        base_closure = closure
        if closure is not None and self.step_protocol.closure is None:
            with torch.enable_grad():
                loss = closure()
            base_closure = None
        check_dense_gradients("E", (p for group in self.param_groups for p in group["params"]))

        raw_grads: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            params, grads, grad_emas = self._init_group(group)
            if not params:
                continue
            extrapolated = e_gradients_(grads, grad_emas, group["e_alpha"], group["e_beta1"])
            for p, grad, new_grad in zip(params, grads, extrapolated):
                raw_grads.append((p, grad))
                p.grad = new_grad
        try:
            if base_closure is None:
                self.base_optimizer.step()
            else:
                loss = self.base_optimizer.step(base_closure)
        finally:
            for p, grad in raw_grads:
                p.grad = grad
        return loss
