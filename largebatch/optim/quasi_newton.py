"""Stochastic L-BFGS: oLBFGS and SQN (Bottou, Curtis & Nocedal 2018, Sec. 6.2, Alg. 6.2).

Both step ``w = w - lr * H g`` with ``H`` the L-BFGS inverse-Hessian estimate from
the last ``memory`` curvature pairs ``(s, y)`` (:func:`two_loop_recursion`,
initial matrix ``gamma I`` with ``gamma = s^T y / y^T y`` of the newest pair;
``H = I`` before the first pair, a plain SGD step). They differ in the pairs:

* **oLBFGS** (Schraudolph, Yu & Guenter 2007; the review's 6.13): every step,
  ``s = w_{k+1} - w_k`` and ``y = grad f_S(w_{k+1}) - grad f_S(w_k)`` on the
  **same** sample ``S``, so the difference measures curvature, not sampling
  noise. Two gradient evaluations per step: the driver's, then the closure's at
  the new point (:attr:`OLBFGS.step_protocol`).
* **SQN** (Byrd, Hansen, Nocedal & Singer 2016; the review's 6.14): every
  ``update_every`` (L) steps, ``s = wbar_t - wbar_{t-1}`` (iterates averaged over
  the last L steps) and ``y = hess f_{S^H}(wbar_t) s``, a Hessian-vector product
  on a separate, larger sample (``hessian_closure``, due when ``hessian_due``).
  One gradient per step plus one product every L steps.

Weight decay is part of the objective, so it enters both gradients of a pair
(oLBFGS) or the product (SQN); ``damping`` adds ``damping * s`` to ``y`` (the
review's ``delta I`` regularisation). **Skip rule**: a pair with
``s^T y <= curvature_eps * ||s|| * ||y||`` (non-positive or nearly orthogonal
curvature, including ``s = 0``) is not stored, which keeps ``H`` positive
definite; ``pairs_skipped`` counts them.

The pairs live in the state of the first parameter, as flat ``(k, d)`` tensors
over all parameters in group order (``torch.optim.LBFGS`` keeps its history the
same way); parameters without a gradient have zero entries and do not move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_lr, check_non_negative
from largebatch.optim._classical import ClassicalOptimizer, check_positive_int
from largebatch.optim.classical_protocol import ClassicalStepProtocol
from largebatch.optim.curvature import FlatParameters, HessianVectorProduct


def two_loop_recursion(
    gradient: Tensor, s: Tensor, y: Tensor, gamma: float | None = None
) -> Tensor:
    """``H g`` for the L-BFGS matrix of pairs ``s[i], y[i]`` (rows, oldest first).

    ``H`` is the BFGS update (review eq. 6.11) applied pair by pair to
    ``gamma I``; ``gamma`` defaults to ``s^T y / y^T y`` of the newest pair (1
    without pairs). About ``4 k d`` flops for ``k`` pairs of length ``d``.
    """
    count = s.shape[0]
    if count == 0:
        return gradient.clone() if gamma is None else gamma * gradient
    rho = 1.0 / (s * y).sum(dim=1)
    if gamma is None:
        gamma = float((s[-1] @ y[-1]) / (y[-1] @ y[-1]))
    q = gradient.clone()
    alphas = torch.empty(count, dtype=gradient.dtype, device=gradient.device)
    for i in range(count - 1, -1, -1):
        alphas[i] = rho[i] * (s[i] @ q)
        q.sub_(y[i] * alphas[i])
    r = q.mul_(gamma)
    for i in range(count):
        beta = rho[i] * (y[i] @ r)
        r.add_(s[i] * (alphas[i] - beta))
    return r


class _StochasticLBFGS(ClassicalOptimizer):
    """The pair memory, the skip rule and the quasi-Newton step shared by oLBFGS and SQN."""

    STATISTICS = ("pairs_stored", "pairs_skipped", "curvature", "direction_norm")
    GLOBAL_KEYS = ("memory", "damping", "curvature_eps")

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_positive_int("memory", group["memory"])
        check_non_negative("damping", group["damping"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_non_negative("curvature_eps", group["curvature_eps"])

    def _memory(self, flat: FlatParameters) -> dict[str, Any]:
        """The optimizer-wide state (pair history, counters), in the first parameter's state."""
        state = self.state[flat.params[0]]
        if "s" not in state:
            empty = torch.zeros(0, flat.dim, dtype=flat.dtype, device=flat.device)
            state.update(s=empty, y=empty.clone(), pairs_skipped=0, step=0)
        return state

    def _store_pair(self, memory: dict[str, Any], s: Tensor, y: Tensor) -> None:
        """Append ``(s, y)`` unless the skip rule rejects it; keep the newest ``memory`` pairs."""
        settings = self.param_groups[0]
        y = y + settings["damping"] * s
        curvature = float(s @ y)
        threshold = settings["curvature_eps"] * float(s.norm() * y.norm())
        if curvature <= threshold or curvature <= 0.0:
            memory["pairs_skipped"] += 1
        else:
            keep = settings["memory"] - 1
            memory["s"] = torch.cat([memory["s"][-keep:] if keep else memory["s"][:0], s[None]])
            memory["y"] = torch.cat([memory["y"][-keep:] if keep else memory["y"][:0], y[None]])
        self._statistics.update(
            pairs_stored=memory["s"].shape[0],
            pairs_skipped=memory["pairs_skipped"],
            curvature=curvature / max(float(s @ s), torch.finfo(s.dtype).tiny),
        )

    def _gradient(self, flat: FlatParameters, used: list[bool]) -> Tensor:
        """The driver's gradient (``.grad``) plus weight decay, as a flat vector."""
        point = flat.vector()
        return (
            flat.flatten(p.grad for p in flat.params)
            + flat.group_values("weight_decay", used) * point
        )

    def _quasi_newton_step(self, flat: FlatParameters, used: list[bool], memory: dict) -> Tensor:
        """``w -= lr * H (g + wd w)``; returns the gradient it used."""
        gradient = self._gradient(flat, used)
        direction = two_loop_recursion(gradient, memory["s"], memory["y"])
        flat.copy_(flat.vector() - flat.group_values("lr", used) * direction)
        memory["step"] += 1
        self._statistics = {
            "pairs_stored": memory["s"].shape[0],
            "pairs_skipped": memory["pairs_skipped"],
            "direction_norm": float(direction.norm()),
        }
        return gradient


class OLBFGS(_StochasticLBFGS):
    """Online L-BFGS: pairs from the same sample at both points, every step.

    Driving it: the driver computes the gradient on the step's batch into
    ``.grad``, then calls ``step(closure)``; the closure is the usual one
    (zero the gradients, loss on the **same** batch, ``backward``, return the
    loss), evaluated once at the new point.

    Args:
        params: parameters or parameter groups.
        lr: step size (``lr * H g``).
        memory: number of stored pairs ``m``.
        damping: ``y += damping * s`` (>= 0).
        weight_decay: L2 coefficient, part of the objective.
        curvature_eps: skip rule threshold (module docstring).
    """

    step_protocol = ClassicalStepProtocol(gradient_before_step=True, closure="same")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        memory: int = 10,
        damping: float = 0.0,
        weight_decay: float = 0.0,
        curvature_eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            memory=memory,
            damping=damping,
            weight_decay=weight_decay,
            curvature_eps=curvature_eps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One step from the driver's gradient; ``closure`` re-evaluates the same batch at the new point."""
        if closure is None:
            raise ValueError(
                "Invalid closure: None; oLBFGS evaluates the step's batch again at the new point"
            )
        flat = FlatParameters(self.param_groups)
        used = flat.gradient_mask()
        memory = self._memory(flat)
        start = flat.vector()
        gradient = self._quasi_newton_step(flat, used, memory)
        with torch.enable_grad():
            loss = closure()
        self._store_pair(memory, flat.vector() - start, self._gradient(flat, used) - gradient)
        return loss


class SQN(_StochasticLBFGS):
    """Stochastic quasi-Newton: Hessian-vector-product pairs at averaged iterates every L steps.

    Driving it: the driver computes the gradient on the step's batch into
    ``.grad`` and calls ``step()``; when ``hessian_due`` is true it passes
    ``hessian_closure``: the loss on a Hessian sample (larger than the batch),
    returned with its graph and without ``backward``. The optimizer evaluates it
    at the averaged iterate ``wbar_t`` (the parameters are restored afterwards).

    Args:
        params: parameters or parameter groups.
        lr: step size.
        memory: number of stored pairs ``m``.
        update_every: ``L``, steps between pairs (10-20 in the review).
        damping: ``y += damping * s`` (>= 0).
        weight_decay: L2 coefficient, part of the objective.
        curvature_eps: skip rule threshold (module docstring).
    """

    STATISTICS = (*_StochasticLBFGS.STATISTICS, "hessian_vector_products")
    GLOBAL_KEYS = (*_StochasticLBFGS.GLOBAL_KEYS, "update_every")
    step_protocol = ClassicalStepProtocol(
        gradient_before_step=True, closure=None, closure_backward=False, hessian_sample=True
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        memory: int = 10,
        update_every: int = 20,
        damping: float = 0.0,
        weight_decay: float = 0.0,
        curvature_eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            memory=memory,
            update_every=update_every,
            damping=damping,
            weight_decay=weight_decay,
            curvature_eps=curvature_eps,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_positive_int("update_every", group["update_every"])

    def _memory(self, flat: FlatParameters) -> dict[str, Any]:
        state = super()._memory(flat)
        if "iterate_sum" not in state:
            state["iterate_sum"] = torch.zeros(flat.dim, dtype=flat.dtype, device=flat.device)
            state["previous_average"] = None
        return state

    @property
    def hessian_due(self) -> bool:
        """Whether the next ``step`` forms a pair and so needs ``hessian_closure``."""
        flat = FlatParameters(self.param_groups)
        memory = self._memory(flat)
        closes_window = (memory["step"] + 1) % self.param_groups[0]["update_every"] == 0
        return closes_window and memory["previous_average"] is not None

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: None = None, hessian_closure: Callable[[], Tensor] | None = None
    ) -> None:
        """One step from the driver's gradient; every L steps a pair from ``hessian_closure``."""
        if closure is not None:
            raise ValueError(
                "Invalid closure: SQN takes its gradient from .grad; pass hessian_closure= instead"
            )
        if self.hessian_due and hessian_closure is None:
            raise ValueError(
                "Invalid hessian_closure: None on a step that forms a curvature pair "
                "(hessian_due is True); pass the loss on a Hessian sample"
            )
        flat = FlatParameters(self.param_groups)
        used = flat.gradient_mask()
        memory = self._memory(flat)
        self._quasi_newton_step(flat, used, memory)
        memory["iterate_sum"] += flat.vector()
        self._statistics["hessian_vector_products"] = 0
        if memory["step"] % self.param_groups[0]["update_every"]:
            return
        average = memory["iterate_sum"] / self.param_groups[0]["update_every"]
        memory["iterate_sum"].zero_()
        previous, memory["previous_average"] = memory["previous_average"], average
        if previous is None:
            return
        current = flat.vector()
        flat.copy_(average)
        with torch.enable_grad():
            hessian = HessianVectorProduct(hessian_closure(), flat, name="hessian_closure loss")
            s = average - previous
            y = hessian(s) + flat.group_values("weight_decay", used) * s
        flat.copy_(current)
        self._store_pair(memory, s, y)
        self._statistics["hessian_vector_products"] = 1
