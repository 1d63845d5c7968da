"""ALTO (Zhao et al., NeurIPS 2025, Alg. 2): LAMB with the E adaptor fused in.

Per parameter tensor (a "layer"), with ``ghat`` the E-transformed gradient of
:mod:`largebatch.optim.transforms`::

    ghat = lerp(mu, g, 1 + alpha (1 - beta1));  mu = lerp(mu, g, 1 - beta1)
    m = beta2 m + (1 - beta2) ghat;             v = beta3 v + (1 - beta3) ghat^2
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * theta      # bias-corrected m, v
    theta -= lr * phi(|theta|) / (|r| + eps2 phi(|theta|)) * r,  phi(x) = x + eps3

This follows the paper, not the reference code (``e-optimizer-adaptor`` 0.1.0),
which also clips the global gradient norm to 1, uses ``|theta| / |r|`` and skips
the ratio wherever weight decay is 0; a group's ``trust_ratio=False`` and
``eps2=eps3=0`` together with a user-side clip reproduce it (see the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from largebatch.optim.transforms import check_e_hyperparameters, e_gradient_, e_gradients_
from largebatch.optim.trust_ratio import (
    alto_trust_ratio,
    group_uses_trust_ratio,
    norms,
    scale_by_ratio_,
)

STATE_KEYS = ("grad_ema", "exp_avg", "exp_avg_sq")


def _check_hyperparameters(hparams: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter."""
    if not hparams["lr"] >= 0.0:
        raise ValueError(f"Invalid learning rate: {hparams['lr']}")
    betas = hparams["betas"]
    if len(betas) != 3:
        raise ValueError(f"Invalid betas: {betas}; ALTO needs (beta1, beta2, beta3)")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    check_e_hyperparameters(hparams["alpha"], betas[0])
    for name in ("weight_decay", "eps", "eps2", "eps3"):
        if not hparams[name] >= 0.0:
            raise ValueError(f"Invalid {name} value: {hparams[name]}")


class ALTO(torch.optim.Optimizer):
    """LAMB fed E-transformed gradients, with bias correction and the paper's trust ratio.

    Args:
        params: parameters or parameter groups. A group may set ``trust_ratio=False``
            (biases, norm weights) to take the plain Adam-style step ``lr * r``.
        lr: learning rate.
        betas: ``(beta1, beta2, beta3)``: EMA factor of the gradient differences (E),
            of the first moment and of the second moment.
        alpha: E strength; ``|alpha| <= 1 / (1 - beta1)``. Negative explores (large
            batches), positive exploits (small batches).
        weight_decay: ``lambda``, added to the update inside the trust ratio (LAMB style).
        eps: ``eps1``, added to ``sqrt(v_hat)``.
        eps2: trust-ratio denominator guard; caps the ratio near ``1 / eps2``.
        eps3: ``phi`` guard; keeps the ratio positive for a zero parameter.
        trust_ratio: default of the per-group layer-wise switch.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``None`` picks it.

    Defaults are the paper's large-batch (>= 1K) ones; ``ALTO(params, **ALTO.SMALL_BATCH)``
    gives its small-batch setting (``alpha=0.5, beta1=0.01``).
    """

    SMALL_BATCH = MappingProxyType({"alpha": 0.5, "betas": (0.01, 0.9, 0.99)})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.99, 0.9, 0.99),
        alpha: float = -5.0,
        weight_decay: float = 1e-4,
        eps: float = 1e-6,
        eps2: float = 1e-6,
        eps3: float = 1e-10,
        *,
        trust_ratio: bool = True,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            alpha=alpha,
            weight_decay=weight_decay,
            eps=eps,
            eps2=eps2,
            eps3=eps3,
            trust_ratio=trust_ratio,
            foreach=foreach,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters (overrides included)."""
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; step counts follow their parameter's device."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                param_state = self.state.get(param)
                if param_state:
                    param_state["step"] = param_state["step"].to(param.device)

    def _init_group(self, group: dict[str, Any]) -> GroupTensors:
        """The group's parameters with a gradient, their gradients and state (created lazily)."""
        params, grads, grad_emas, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ALTO does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in STATE_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            grad_emas.append(state["grad_ema"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return GroupTensors(params, grads, grad_emas, exp_avgs, exp_avg_sqs, steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One ALTO step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = self._init_group(group)
            if tensors.params:
                alto(tensors, StepHyperparameters.from_group(group), foreach=group["foreach"])
        return loss


class GroupTensors(NamedTuple):
    """One group's parameters that have a gradient, their gradients and their state."""

    params: list[Tensor]
    grads: list[Tensor]
    grad_emas: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]


@dataclass(frozen=True)
class StepHyperparameters:
    """One group's hyperparameters, as the step kernels read them."""

    lr: float
    alpha: float
    beta1: float
    beta2: float
    beta3: float
    weight_decay: float
    eps: float
    eps2: float
    eps3: float
    trust_ratio: bool

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> StepHyperparameters:
        beta1, beta2, beta3 = group["betas"]
        return cls(
            lr=group["lr"],
            alpha=group["alpha"],
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            eps2=group["eps2"],
            eps3=group["eps3"],
            trust_ratio=group_uses_trust_ratio(group),
        )


def alto(tensors: GroupTensors, hp: StepHyperparameters, *, foreach: bool | None = None) -> None:
    """Functional ALTO step on one group (state updated in place); ``foreach=None`` picks multi-tensor."""
    if foreach is False:
        _single_tensor_alto(tensors, hp)
    else:
        _multi_tensor_alto(tensors, hp)


def _single_tensor_alto(tensors: GroupTensors, hp: StepHyperparameters) -> None:
    """One tensor at a time."""
    for param, grad, grad_ema, exp_avg, exp_avg_sq, step_t in zip(*tensors):
        step_t += 1
        step = step_t.to(param.dtype)
        extrapolated = e_gradient_(grad, grad_ema, hp.alpha, hp.beta1)
        exp_avg.lerp_(extrapolated, 1.0 - hp.beta2)
        exp_avg_sq.mul_(hp.beta3).addcmul_(extrapolated, extrapolated, value=1.0 - hp.beta3)
        bias_correction2 = 1.0 - hp.beta2**step
        bias_correction3_sqrt = (1.0 - hp.beta3**step).sqrt()
        update = (exp_avg / bias_correction2) / (exp_avg_sq.sqrt() / bias_correction3_sqrt + hp.eps)
        if hp.weight_decay != 0.0:
            update.add_(param, alpha=hp.weight_decay)
        if hp.trust_ratio:
            param_norm = torch.linalg.vector_norm(param)
            update_norm = torch.linalg.vector_norm(update)
            update.mul_(alto_trust_ratio(param_norm, update_norm, eps2=hp.eps2, eps3=hp.eps3))
        param.add_(update, alpha=-hp.lr)


def _multi_tensor_alto(tensors: GroupTensors, hp: StepHyperparameters) -> None:
    """All tensors of one device and dtype per ``torch._foreach_*`` call."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [tensors.params, tensors.grads, tensors.grad_emas, tensors.exp_avgs, tensors.exp_avg_sqs],
        with_indices=True,
    )
    for (params, grads, grad_emas, exp_avgs, exp_avg_sqs), indices in grouped.values():
        steps = [tensors.steps[i] for i in indices]
        torch._foreach_add_(steps, 1.0)
        step = torch.stack(steps).to(params[0].dtype)
        bias_corrections2 = (1.0 - hp.beta2**step).unbind()
        bias_corrections3_sqrt = (1.0 - hp.beta3**step).sqrt().unbind()

        extrapolated = e_gradients_(grads, grad_emas, hp.alpha, hp.beta1)
        torch._foreach_lerp_(exp_avgs, extrapolated, 1.0 - hp.beta2)
        torch._foreach_mul_(exp_avg_sqs, hp.beta3)
        torch._foreach_addcmul_(exp_avg_sqs, extrapolated, extrapolated, 1.0 - hp.beta3)

        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, bias_corrections3_sqrt)
        torch._foreach_add_(denominators, hp.eps)
        updates = torch._foreach_div(exp_avgs, bias_corrections2)
        torch._foreach_div_(updates, denominators)
        if hp.weight_decay != 0.0:
            torch._foreach_add_(updates, params, alpha=hp.weight_decay)
        if hp.trust_ratio:
            ratios = alto_trust_ratio(norms(params), norms(updates), eps2=hp.eps2, eps3=hp.eps3)
            scale_by_ratio_(updates, ratios)
        torch._foreach_add_(params, updates, alpha=-hp.lr)
