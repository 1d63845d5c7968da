"""SVRG: stochastic variance-reduced gradient (Johnson & Zhang 2013; the review's Algorithm 5.1).

For a finite sum ``R_n(w) = (1/n) sum_i f_i(w)``, SVRG keeps a snapshot ``wt``
and its full gradient ``mu = grad R_n(wt)``, and steps along

    g = grad f_S(w) + (mu - grad f_S(wt))  (+ weight_decay * w)

an unbiased estimate of ``grad R_n(w)`` whose variance vanishes as ``w`` and
``wt`` approach the minimizer: a linear rate with a constant step where SG
stalls at its noise floor.

**Snapshot protocol** (:class:`~largebatch.optim.classical_protocol.ClassicalStepProtocol`,
``snapshots=True``). Whenever :attr:`SVRG.snapshot_due` is true (before the
first step, then after every ``inner_steps`` steps) the driver calls
``snapshot(closure)``. The optimizer first moves the parameters to the snapshot
point (``snapshot_point="last"``: where they are, the review's option (a);
``"average"``: the mean of the inner iterates since the last snapshot, option
(b)), then calls ``closure``, which must zero the gradients, accumulate the
gradient of the mean loss over the **whole** training set into ``.grad`` (one
pass, ``n`` example gradients, averaged across ranks like any gradient) and
return that loss. Each ``step(closure)`` then needs the driver's gradient at
``w`` on the batch ``S`` in ``.grad``, and calls ``closure`` once, the usual
closure on the **same** batch, with the parameters temporarily at ``wt``:
two batch gradients per step, ``n + 2 m b`` example gradients per snapshot
period of ``m`` steps of batch ``b``.

The snapshot (``wt``, ``mu``, and the running average for option (b)) is in each
parameter's state, so ``state_dict`` round-trips exactly; memory is three
copies of the parameters (four with option (b)). The snapshot schedule is
shared by all parameters: one that has no gradient at a snapshot gets none,
and steps along its plain gradient until the next (the registry declares
SVRG as ``couples_parameters``). Statistics stay on the device until read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_lr, check_non_negative
from largebatch.optim._classical import ClassicalOptimizer, check_choice, check_positive_int
from largebatch.optim.classical_protocol import ClassicalStepProtocol

SNAPSHOT_POINTS = ("last", "average")


def _single_tensor_svrg(
    params: list[Tensor],
    grads: list[Tensor],
    corrections: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
) -> None:
    for param, grad, correction in zip(params, grads, corrections):
        direction = grad + correction
        if weight_decay:
            direction.add_(param, alpha=weight_decay)
        param.add_(direction, alpha=-lr)


def _multi_tensor_svrg(
    params: list[Tensor],
    grads: list[Tensor],
    corrections: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
) -> None:
    directions = torch._foreach_add(grads, corrections)
    if weight_decay:
        torch._foreach_add_(directions, params, alpha=weight_decay)
    torch._foreach_add_(params, directions, alpha=-lr)


class SVRG(ClassicalOptimizer):
    """Stochastic variance-reduced gradient with a driver-run snapshot (module docstring).

    Args:
        params: parameters or parameter groups.
        lr: constant step size (the theory asks ``lr < 1/(4L)``; ``0.1/L`` is typical).
        inner_steps: ``m``, steps between snapshots (the review suggests about
            ``2n/b``: two passes' worth of steps).
        snapshot_point: ``"last"`` (option a) or ``"average"`` (option b).
        weight_decay: L2 coefficient added to the direction (exact, not sampled).
        foreach: use the multi-tensor path (default) or the per-tensor loop (False).

    Raises:
        ValueError: ``step`` before any ``snapshot``.
    """

    STATISTICS = ("snapshots", "steps_since_snapshot", "snapshot_loss", "full_gradient_norm")
    GLOBAL_KEYS = ("inner_steps", "snapshot_point")
    step_protocol = ClassicalStepProtocol(gradient_before_step=True, closure="same", snapshots=True)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        inner_steps: int = 100,
        snapshot_point: str = "last",
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            inner_steps=inner_steps,
            snapshot_point=snapshot_point,
            weight_decay=weight_decay,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        self.state["svrg"] = {"snapshots": 0, "steps_since_snapshot": 0}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_positive_int("inner_steps", group["inner_steps"])
        check_choice("snapshot_point", group["snapshot_point"], SNAPSHOT_POINTS)
        check_non_negative("weight_decay", group["weight_decay"])
        check_choice("foreach", group["foreach"], (None, True, False))

    @property
    def snapshot_due(self) -> bool:
        """True before the first snapshot and once ``inner_steps`` steps have followed the last."""
        counters = self.state["svrg"]
        inner_steps = self.param_groups[0]["inner_steps"]
        return counters["snapshots"] == 0 or counters["steps_since_snapshot"] >= inner_steps

    def _count(self, **changes: int) -> dict[str, int]:
        """Replace the counters (a new dict, so a saved ``state_dict`` never changes afterwards)."""
        self.state["svrg"] = {**self.state["svrg"], **changes}
        return self.state["svrg"]

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def snapshot(self, closure: Callable[[], Tensor]) -> Tensor:
        """Move to the snapshot point, then store it and the full gradient ``closure`` leaves in ``.grad``.

        Parameters without a gradient get no snapshot: until the next one they step
        along their plain gradient, should they get one (see :meth:`step`).
        """
        averaging = self.param_groups[0]["snapshot_point"] == "average"
        if averaging and self.state["svrg"]["steps_since_snapshot"] > 0:
            for p in self._params():
                if "average" in self.state[p]:
                    p.copy_(self.state[p]["average"])
        with torch.enable_grad():
            loss = closure()
        full_sqnorm = torch.zeros((), dtype=torch.float64)
        for p in self._params():
            state = self.state[p]
            for key in ("snapshot", "full_grad", "average"):
                state.pop(key, None)
            if p.grad is None:
                continue
            state["snapshot"] = p.detach().clone()
            state["full_grad"] = p.grad.detach().clone()
            full_sqnorm = full_sqnorm.to(p.device) + state["full_grad"].double().pow(2).sum()
            if averaging:
                state["average"] = p.detach().clone()
        counters = self._count(
            snapshots=self.state["svrg"]["snapshots"] + 1, steps_since_snapshot=0
        )
        self._statistics = {
            **counters,
            "snapshot_loss": loss.detach(),
            "full_gradient_norm": full_sqnorm.sqrt(),
        }
        return loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One variance-reduced step; ``closure`` re-evaluates the step's batch at the snapshot.

        A parameter with a gradient but no snapshot (it had no gradient at the last
        one) steps along its plain gradient until the next snapshot.
        """
        if self.state["svrg"]["snapshots"] == 0:
            raise ValueError(
                "Invalid SVRG state: snapshots=0; call optimizer.snapshot(full_gradient_closure) "
                "before the first step (snapshot_due is True)"
            )
        if closure is None:
            raise ValueError("Invalid closure: None; SVRG re-evaluates the batch at the snapshot")
        active = [p for p in self._params() if p.grad is not None]
        if any(p.grad.is_sparse for p in active):
            raise RuntimeError("SVRG does not support sparse gradients")
        reduced = [p for p in active if "snapshot" in self.state[p]]
        grads = {p: p.grad.detach().clone() for p in active}
        current = {p: p.detach().clone() for p in reduced}
        for p in reduced:
            p.copy_(self.state[p]["snapshot"])
        with torch.enable_grad():
            loss = closure()
        corrections = {
            p: self.state[p]["full_grad"]
            - (torch.zeros_like(p) if p.grad is None else p.grad.detach())
            for p in reduced
        }
        for p in reduced:
            p.copy_(current[p])
        for p in active:
            p.grad = grads[p]  # the step's own gradient at w, as after a plain step
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            if not params:
                continue
            update = _single_tensor_svrg if group["foreach"] is False else _multi_tensor_svrg
            update(
                params,
                [grads[p] for p in params],
                [corrections.get(p, torch.zeros_like(p)) for p in params],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
            )
        counters = self._count(steps_since_snapshot=self.state["svrg"]["steps_since_snapshot"] + 1)
        if self.param_groups[0]["snapshot_point"] == "average":
            for p in reduced:
                self.state[p]["average"].lerp_(p, 1.0 / counters["steps_since_snapshot"])
        self._statistics = {**self._statistics, **counters}
        return loss
