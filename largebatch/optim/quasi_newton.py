"""Stochastic L-BFGS: oLBFGS, SQN and L-BFGS (Bottou, Curtis & Nocedal 2018, Sec. 6.2, Alg. 6.2).

All step ``w = w - a * H g`` with ``H`` the L-BFGS inverse-Hessian estimate from
the last ``memory`` curvature pairs ``(s, y)`` (:func:`two_loop_recursion`,
initial matrix ``gamma I`` with ``gamma = s^T y / y^T y`` of the newest pair;
``H = I`` before the first pair, a plain gradient step). They differ in the
pairs and the step length ``a``:

* **oLBFGS** (Schraudolph, Yu & Guenter 2007; the review's 6.13): every step,
  ``s = w_{k+1} - w_k`` and ``y = grad f_S(w_{k+1}) - grad f_S(w_k)`` on the
  **same** sample ``S``, so the difference measures curvature, not sampling
  noise. ``a = lr``. Two gradient evaluations per step: the driver's, then the
  closure's at the new point (:attr:`OLBFGS.step_protocol`).
* **SQN** (Byrd, Hansen, Nocedal & Singer 2016; the review's 6.14): every
  ``update_every`` (L) steps, ``s = wbar_t - wbar_{t-1}`` (iterates averaged over
  the last L steps) and ``y = hess f_{S^H}(wbar_t) s``, a Hessian-vector product
  on a separate, larger sample (``hessian_closure``, due when ``hessian_due``).
  ``a = lr``. One gradient per step plus one product every L steps.
* **L-BFGS** (:class:`LBFGS`; Nocedal & Wright Alg. 7.5 with Armijo backtracking):
  pairs from consecutive iterates, ``a`` by backtracking from ``lr`` on the
  step's sample. On the full training set (batch = n) it is the classical
  deterministic method the review compares SG with (its Fig. 3.1); on smaller
  batches its pairs mix curvature with sampling noise, which is what oLBFGS and
  SQN avoid.

Weight decay is part of the objective, so it enters both gradients of a pair
(oLBFGS, L-BFGS) or the product (SQN); ``damping`` adds ``damping * s`` to ``y``
(the review's ``delta I`` regularisation). **Skip rule**: a pair with
``s^T y <= curvature_eps * ||s|| * ||y||`` (non-positive or nearly orthogonal
curvature, including ``s = 0``) is not stored, which keeps ``H`` positive
definite; ``pairs_skipped`` counts them.

**Memory** (:class:`PairMemory` layout): the pairs live in the state of the first
parameter as a ring of ``memory`` slots, flat ``(memory, d)`` tensors over all
parameters in group order (``torch.optim.LBFGS`` keeps its history flat the
same way), with ``rho = 1 / s^T y`` per slot and ``rho = 0`` for an empty slot,
which makes it inert in the two-loop recursion. Storing or skipping a pair is
decided on the device (``torch.where``), so oLBFGS and SQN never read a value
back to the host during a step (no synchronisation on a GPU; they also step on
``meta`` tensors). Parameters without a gradient have zero entries and do not
move. All three couple every parameter: one that gets its first gradient late
joins a memory built without it, so it does not step as a fresh optimizer
would (the registry declares this, ``couples_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_lr, check_non_negative
from largebatch.optim._classical import (
    ClassicalOptimizer,
    check_open_unit,
    check_positive_int,
    reject_meta,
)
from largebatch.optim.classical_protocol import ClassicalStepProtocol
from largebatch.optim.curvature import (
    FlatParameters,
    HessianVectorProduct,
    average_across_ranks,
    line_search,
    require_graph,
)


def two_loop_recursion(
    gradient: Tensor,
    s: Tensor,
    y: Tensor,
    gamma: float | Tensor | None = None,
    rho: Tensor | None = None,
) -> Tensor:
    """``H g`` for the L-BFGS matrix of pairs ``s[i], y[i]`` (rows, oldest first).

    ``H`` is the BFGS update (review eq. 6.11) applied pair by pair to
    ``gamma I``; ``gamma`` defaults to ``s^T y / y^T y`` of the newest pair (1
    without pairs). ``rho`` (default ``1 / s_i^T y_i``) may hold zeros: such a
    pair changes nothing, which is how empty memory slots are skipped without
    reading anything back from the device. About ``4 k d`` flops for ``k``
    pairs of length ``d``.
    """
    count = s.shape[0]
    if count == 0:
        return gradient.clone() if gamma is None else gamma * gradient
    if rho is None:
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
    """The pair memory, the skip rule and the quasi-Newton direction of oLBFGS, SQN and L-BFGS."""

    STATISTICS = ("pairs_stored", "pairs_skipped", "curvature", "direction_norm")
    GLOBAL_KEYS = ("memory", "damping", "curvature_eps")

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_positive_int("memory", group["memory"])
        check_non_negative("damping", group["damping"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_non_negative("curvature_eps", group["curvature_eps"])

    def _memory(self, flat: FlatParameters) -> dict[str, Any]:
        """The optimizer-wide state (pair ring, counters), in the first parameter's state.

        ``s``, ``y``: ``(memory, d)``; ``rho``: ``(memory,)``, 0 for an empty slot;
        ``slot``: where the next stored pair goes (the oldest one); ``gamma``: of the
        newest stored pair (1 before any); ``step``: a host-side step count. The
        counters are tensors of the parameters' dtype (``load_state_dict`` casts
        every state tensor to it), holding whole numbers.
        """
        state = self.state[flat.params[0]]
        if "s" not in state:
            slots = self.param_groups[0]["memory"]
            options = dict(dtype=flat.dtype, device=flat.device)
            state.update(
                s=torch.zeros(slots, flat.dim, **options),
                y=torch.zeros(slots, flat.dim, **options),
                rho=torch.zeros(slots, **options),
                gamma=torch.ones((), **options),
                slot=torch.zeros((), **options),
                pairs_stored=torch.zeros((), **options),
                pairs_skipped=torch.zeros((), **options),
                step=0,
            )
        return state

    def curvature_pairs(self) -> tuple[Tensor, Tensor]:
        """The stored pairs ``(s, y)``, oldest first, as ``(k, d)`` tensors (for inspection)."""
        memory = self._memory(FlatParameters(self.param_groups))
        order = self._chronological(memory)
        order = order[len(order) - int(memory["pairs_stored"]) :]
        return memory["s"].index_select(0, order), memory["y"].index_select(0, order)

    @staticmethod
    def _chronological(memory: dict[str, Any]) -> Tensor:
        """Slot indices from the oldest to the newest."""
        slots = memory["rho"].shape[0]
        slot = memory["slot"].long()
        return (slot + torch.arange(slots, device=slot.device)) % slots

    def _direction(self, gradient: Tensor, memory: dict[str, Any]) -> Tensor:
        """``H gradient`` from the stored pairs."""
        order = self._chronological(memory)
        return two_loop_recursion(
            gradient,
            memory["s"].index_select(0, order),
            memory["y"].index_select(0, order),
            gamma=memory["gamma"],
            rho=memory["rho"].index_select(0, order),
        )

    def _store_pair(self, memory: dict[str, Any], s: Tensor, y: Tensor) -> None:
        """Store ``(s, y)`` in the oldest slot unless the skip rule rejects it (on the device)."""
        settings = self.param_groups[0]
        y = y + settings["damping"] * s
        curvature = s @ y
        accept = (curvature > settings["curvature_eps"] * s.norm() * y.norm()) & (curvature > 0)
        slot = memory["slot"].long().view(1)
        for key, new in (("s", s), ("y", y)):
            old = memory[key].index_select(0, slot)
            memory[key].index_copy_(0, slot, torch.where(accept, new[None], old))
        rho = memory["rho"].index_select(0, slot)
        memory["rho"].index_copy_(0, slot, torch.where(accept, 1.0 / curvature, rho))
        memory["gamma"] = torch.where(accept, curvature / (y @ y), memory["gamma"])
        memory["slot"] = torch.where(
            accept, (memory["slot"] + 1) % len(memory["rho"]), memory["slot"]
        )
        stored = memory["pairs_stored"] + accept
        memory["pairs_stored"] = stored.clamp(max=len(memory["rho"]))
        memory["pairs_skipped"] = memory["pairs_skipped"] + ~accept
        tiny = torch.finfo(s.dtype).tiny
        self._statistics.update(
            pairs_stored=memory["pairs_stored"],
            pairs_skipped=memory["pairs_skipped"],
            curvature=curvature / (s @ s).clamp(min=tiny),
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
        direction = self._direction(gradient, memory)
        flat.copy_(flat.vector() - flat.group_values("lr", used) * direction)
        memory["step"] += 1
        self._statistics = {
            "pairs_stored": memory["pairs_stored"],
            "pairs_skipped": memory["pairs_skipped"],
            "direction_norm": direction.norm(),
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
    ``.grad`` (or passes torch's usual ``closure``, called first) and calls
    ``step()``; when ``hessian_due`` is true it passes ``hessian_closure``: the
    loss on a Hessian sample (larger than the batch), returned with its graph
    and without ``backward``. The optimizer evaluates it at the averaged iterate
    ``wbar_t`` (the parameters are restored afterwards).

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
        self,
        closure: Callable[[], Tensor] | None = None,
        hessian_closure: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """One step from ``.grad`` (``closure``, if given, recomputes it first, torch's way);
        every L steps a pair from ``hessian_closure``. Returns the closure's loss, if any."""
        if self.hessian_due and hessian_closure is None:
            raise ValueError(
                "Invalid hessian_closure: None on a step that forms a curvature pair "
                "(hessian_due is True); pass the loss on a Hessian sample"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = FlatParameters(self.param_groups)
        used = flat.gradient_mask()
        memory = self._memory(flat)
        self._quasi_newton_step(flat, used, memory)
        memory["iterate_sum"] += flat.vector()
        self._statistics["hessian_vector_products"] = 0
        if memory["step"] % self.param_groups[0]["update_every"]:
            return loss
        average = memory["iterate_sum"] / self.param_groups[0]["update_every"]
        memory["iterate_sum"].zero_()
        previous, memory["previous_average"] = memory["previous_average"], average
        if previous is None:
            return loss
        current = flat.vector()
        flat.copy_(average)
        with torch.enable_grad():
            hessian = HessianVectorProduct(hessian_closure(), flat, name="hessian_closure loss")
            s = average - previous
            y = hessian(s) + flat.group_values("weight_decay", used) * s
        flat.copy_(current)
        self._store_pair(memory, s, y)
        self._statistics["hessian_vector_products"] = 1
        return loss


class LBFGS(_StochasticLBFGS):
    """L-BFGS with Armijo backtracking on the step's sample; full batch, the classical method.

    Each step evaluates the loss closure at ``w`` (with its graph, like
    Newton-CG: ``closure_backward=False``), forms the pair with the previous
    step's point and gradient, takes the direction ``-H g`` and the largest
    ``lr * backtrack_factor^t`` with sufficient decrease (trial losses under
    ``torch.no_grad()``). If no trial passes, the memory is emptied so the next
    step falls back to steepest descent. Under DDP the gradient and trial
    losses are averaged across ranks. Cost per step: one gradient and one
    forward pass per trial.

    Args:
        params: parameters or parameter groups.
        lr: the first trial step (1 is the quasi-Newton step).
        memory: number of stored pairs ``m``.
        damping: ``y += damping * s`` (>= 0).
        weight_decay: L2 coefficient, part of the objective.
        curvature_eps: skip rule threshold (module docstring).
        backtrack_factor: the line search's shrink factor in (0, 1).
        armijo: the sufficient-decrease constant in (0, 1).
    """

    STATISTICS = (*_StochasticLBFGS.STATISTICS, "loss", "step_size", "line_search_trials")
    GLOBAL_KEYS = (*_StochasticLBFGS.GLOBAL_KEYS, "backtrack_factor", "armijo")
    step_protocol = ClassicalStepProtocol(
        gradient_before_step=False, closure="same", closure_backward=False
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        memory: int = 10,
        damping: float = 0.0,
        weight_decay: float = 0.0,
        curvature_eps: float = 1e-8,
        backtrack_factor: float = 0.5,
        armijo: float = 1e-4,
    ) -> None:
        defaults = dict(
            lr=lr,
            memory=memory,
            damping=damping,
            weight_decay=weight_decay,
            curvature_eps=curvature_eps,
            backtrack_factor=backtrack_factor,
            armijo=armijo,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_open_unit("backtrack_factor", group["backtrack_factor"])
        check_open_unit("armijo", group["armijo"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; meta tensors are refused (the line search compares loss values)."""
        super().add_param_group(reject_meta(param_group, "L-BFGS's line search"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One step; ``closure`` returns the loss on the step's sample with its graph."""
        if closure is None:
            raise ValueError("Invalid closure: None; L-BFGS needs a closure returning the loss")
        settings = self.param_groups[0]
        flat = FlatParameters(self.param_groups)
        memory = self._memory(flat)
        with torch.enable_grad():
            loss = closure()
            require_graph(loss, "closure loss")
            grads = torch.autograd.grad(loss, flat.params, allow_unused=True)
        used = [g is not None for g in grads]
        start = flat.vector()
        decay = flat.group_values("weight_decay", used)
        gradient = average_across_ranks(flat.flatten(grads)) + decay * start
        if "previous_point" in memory:
            self._store_pair(
                memory, start - memory["previous_point"], gradient - memory["previous_gradient"]
            )
        direction = -flat.group_values("lr", used) * self._direction(gradient, memory)
        loss_value = float(average_across_ranks(loss.detach().double().clone()))

        search = line_search(
            flat,
            closure,
            start,
            direction,
            gradient,
            decay,
            loss_value,
            factor=settings["backtrack_factor"],
            sufficient_decrease=settings["armijo"],
        )
        memory["previous_point"], memory["previous_gradient"] = start, gradient
        memory["step"] += 1
        if not search.accepted:  # start over from steepest descent
            memory["rho"].zero_()
            memory["pairs_stored"] = torch.zeros_like(memory["pairs_stored"])
            memory["gamma"] = torch.ones_like(memory["gamma"])
        for p, g in zip(flat.params, grads):
            if g is not None:
                p.grad = g.detach()
        self._statistics.update(
            pairs_stored=memory["pairs_stored"],
            pairs_skipped=memory["pairs_skipped"],
            direction_norm=direction.norm(),
            loss=loss_value,
            step_size=search.step_size,
            line_search_trials=search.trials,
        )
        return loss.detach()
