"""Subsampled Hessian-free Newton-CG (Bottou, Curtis & Nocedal 2018, Algorithm 6.1).

At the iterate ``w`` with gradient sample ``S`` and Hessian sample ``S^H``::

    g = grad f_S(w) + wd * w                       # weight decay is part of the objective
    H v = hess f_{S^H}(w) v + (wd + damping) v     # by double backward, never formed
    s = CG(H, -g) from 0, until ||H s + g|| <= rho ||g||, max_cg products,
        or a direction p with p^T H p <= 0 (then the iterate so far; -g at the first)
    a = the largest lr * backtrack_factor^t with
        f_S(w + a s) <= f_S(w) + armijo * a * g^T s       # Armijo, on the gradient sample
    w = w + a s

``rho`` is ``cg_tol`` (``forcing="fixed"``: linear convergence at a rate that
improves with ``rho``) or ``min(cg_tol, sqrt(||g||))`` (``forcing="superlinear"``,
Nocedal & Wright Thm 7.2: superlinear near a minimizer with a full-batch
gradient and Hessian). ``damping`` adds ``damping * I`` (Levenberg-Marquardt
style) for non-convex losses.

Driving it (:class:`~largebatch.optim.classical_protocol.ClassicalStepProtocol`)::

    def closure():                     # loss on S at the current parameters, no backward
        return loss_fn(model(x), y)
    def hessian_closure():             # same, on S^H (optional; default S^H = S)
        return loss_fn(model(x[:h]), y[:h])
    optimizer.step(closure, hessian_closure)   # hessian_closure=closure also means S^H = S

The closure is evaluated once with gradients enabled (gradient, and with no
``hessian_closure`` also the Hessian graph) and once per line-search trial under
``torch.no_grad()``; it must be deterministic (dropout off or seeded). Cost of a
step: one gradient, one Hessian graph (when ``S^H`` differs), up to ``max_cg``
Hessian-vector products on ``S^H`` and one forward pass per trial on ``S``.
Under DDP the gradient, the products and the trial losses are averaged across
ranks. The CG and line-search settings are global (one solve covers all groups):
every group must share them; ``lr`` and ``weight_decay`` may differ per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_lr, check_non_negative
from largebatch.optim._classical import (
    ClassicalOptimizer,
    check_choice,
    check_open_unit,
    check_positive_int,
    reject_meta,
)
from largebatch.optim.classical_protocol import ClassicalStepProtocol
from largebatch.optim.curvature import (
    FlatParameters,
    HessianVectorProduct,
    average_across_ranks,
    conjugate_gradient,
    line_search,
)

LossClosure = Callable[[], Tensor]
FORCING = ("fixed", "superlinear")


class NewtonCG(ClassicalOptimizer):
    """Subsampled Hessian-free Newton-CG with Armijo backtracking (module docstring).

    Args:
        params: parameters or parameter groups.
        lr: the first trial step of the line search (1 is the Newton step).
        cg_tol: CG's relative residual tolerance ``rho`` in (0, 1).
        max_cg: CG's iteration cap (Hessian-vector products per step).
        forcing: ``"fixed"`` (``rho = cg_tol``) or ``"superlinear"``
            (``rho = min(cg_tol, sqrt(||g||))``).
        damping: ``lambda >= 0`` added to the Hessian's diagonal.
        weight_decay: L2 coefficient, part of the objective (loss, gradient, Hessian).
        backtrack_factor: ``gamma`` in (0, 1), the line search's shrink factor.
        armijo: ``eta`` in (0, 1), the sufficient-decrease constant.
    """

    STATISTICS = (
        "loss",
        "gradient_norm",
        "cg_iterations",
        "cg_relative_residual",
        "negative_curvature",
        "step_size",
        "line_search_trials",
        "line_search_failed",
        "hessian_vector_products",
    )
    step_protocol = ClassicalStepProtocol(
        gradient_before_step=False, closure="same", closure_backward=False, hessian_sample=True
    )
    GLOBAL_KEYS = ("cg_tol", "max_cg", "forcing", "damping", "backtrack_factor", "armijo")
    hessian_due = True  # a Hessian sample is welcome on every step

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        cg_tol: float = 0.1,
        max_cg: int = 10,
        forcing: str = "fixed",
        damping: float = 0.0,
        weight_decay: float = 0.0,
        backtrack_factor: float = 0.5,
        armijo: float = 1e-4,
    ) -> None:
        defaults = dict(
            lr=lr,
            cg_tol=cg_tol,
            max_cg=max_cg,
            forcing=forcing,
            damping=damping,
            weight_decay=weight_decay,
            backtrack_factor=backtrack_factor,
            armijo=armijo,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_open_unit("cg_tol", group["cg_tol"])
        check_positive_int("max_cg", group["max_cg"])
        check_choice("forcing", group["forcing"], FORCING)
        check_non_negative("damping", group["damping"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_open_unit("backtrack_factor", group["backtrack_factor"])
        check_open_unit("armijo", group["armijo"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; meta tensors are refused (CG's exit tests and the line search read values)."""
        super().add_param_group(reject_meta(param_group, "Newton-CG's CG and line search"))

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: LossClosure, hessian_closure: LossClosure | None = None
    ) -> Tensor:
        """One Newton-CG step; returns the loss at the starting point (detached)."""
        if closure is None:
            raise ValueError("Invalid closure: None; Newton-CG needs a closure returning the loss")
        settings = self.param_groups[0]
        flat = FlatParameters(self.param_groups)
        with torch.enable_grad():
            loss = closure()
            if hessian_closure is None or hessian_closure is closure:
                hessian = HessianVectorProduct(loss, flat, name="closure loss")
                gradient, used = hessian.gradient, hessian.used
            else:
                grads = torch.autograd.grad(loss, flat.params, allow_unused=True)
                gradient = average_across_ranks(flat.flatten(grads))
                used = [g is not None for g in grads]
                hessian = HessianVectorProduct(hessian_closure(), flat, name="hessian_closure loss")
        loss_value = float(average_across_ranks(loss.detach().double().clone()))

        start = flat.vector()
        decay = flat.group_values("weight_decay", used)
        shift = decay + settings["damping"] * flat.spread(used)
        gradient_step = gradient.clone()
        gradient.add_(decay * start)
        gradient_norm = float(gradient.norm())
        tol = settings["cg_tol"]
        if settings["forcing"] == "superlinear":
            tol = min(tol, math.sqrt(gradient_norm))
        solve = conjugate_gradient(
            lambda v: hessian(v).add_(shift * v), -gradient, tol=tol, max_iter=settings["max_cg"]
        )
        step = flat.group_values("lr", used) * solve.solution

        search = line_search(
            flat,
            closure,
            start,
            step,
            gradient,
            decay,
            loss_value,
            factor=settings["backtrack_factor"],
            sufficient_decrease=settings["armijo"],
        )
        for p, g, has_gradient in zip(flat.params, flat.split(gradient_step), used):
            if has_gradient:
                p.grad = g.clone()
        self._statistics = {
            "loss": loss_value,
            "gradient_norm": gradient_norm,
            "cg_iterations": solve.iterations,
            "cg_relative_residual": solve.relative_residual,
            "negative_curvature": float(solve.negative_curvature),
            "step_size": search.step_size,
            "line_search_trials": search.trials,
            "line_search_failed": float(not search.accepted),
            "hessian_vector_products": hessian.num_products,
        }
        return loss.detach()
