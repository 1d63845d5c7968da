"""Second-order machinery shared by Newton-CG and the stochastic quasi-Newton methods.

* :class:`FlatParameters`: an optimizer's parameters as one flat vector, with
  per-group hyperparameters spread over their slices (the curvature methods work
  on the whole parameter vector, as ``torch.optim.LBFGS`` does).
* :class:`HessianVectorProduct`: ``v -> H v`` for the loss a closure returns, by
  double backward. The gradient graph is built once and reused for every
  product at the same point, which is what conjugate gradients need; on CPU this
  is the faster of the two ways torch offers (``torch.func.jvp`` over
  ``torch.func.grad`` is the other; ``benchmarks/hvp.py`` measures both,
  ``docs/classical.md`` has the figures).
* :func:`conjugate_gradient`: truncated CG with a relative-residual tolerance, an
  iteration cap and an exit on non-positive curvature.
* :func:`armijo_backtracking`: the sufficient-decrease line search, and
  :func:`line_search`, the same on a loss closure plus weight decay over the
  flat parameters (Newton-CG and L-BFGS).
* :func:`average_across_ranks`: what replaces DDP's gradient averaging for
  quantities computed with ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def average_across_ranks(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place when torch.distributed runs more than one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


class FlatParameters:
    """The parameters of ``param_groups`` as one flat vector, in group order.

    Args:
        param_groups: an optimizer's ``param_groups`` (each a dict with ``"params"``).
    """

    def __init__(self, param_groups: Sequence[dict[str, Any]]) -> None:
        self.param_groups = param_groups
        self.params = [p for group in param_groups for p in group["params"]]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device

    def vector(self) -> Tensor:
        """A copy of the current parameter values."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def flatten(self, tensors: Iterable[Tensor | None]) -> Tensor:
        """One flat vector from per-parameter tensors; ``None`` (no gradient) becomes zeros."""
        return torch.cat(
            [
                torch.zeros(n, dtype=self.dtype, device=self.device)
                if t is None
                else t.detach().reshape(-1).to(self.dtype)
                for t, n in zip(tensors, self.numels)
            ]
        )

    def split(self, vector: Tensor) -> list[Tensor]:
        """Views of ``vector`` shaped like the parameters."""
        return [piece.view_as(p) for piece, p in zip(torch.split(vector, self.numels), self.params)]

    def copy_(self, vector: Tensor) -> None:
        """Set the parameters to ``vector``."""
        with torch.no_grad():
            for p, piece in zip(self.params, self.split(vector)):
                p.copy_(piece)

    def spread(self, values: Sequence[float]) -> Tensor:
        """A flat vector holding ``values[i]`` over the slice of parameter ``i``."""
        return torch.cat(
            [
                torch.full((n,), float(v), dtype=self.dtype, device=self.device)
                for v, n in zip(values, self.numels)
            ]
        )

    def group_values(self, key: str, mask: Sequence[bool] | None = None) -> Tensor:
        """Each group's ``key`` spread over its parameters (0 where ``mask`` is False)."""
        values = [group[key] for group in self.param_groups for _ in group["params"]]
        if mask is not None:
            values = [v if keep else 0.0 for v, keep in zip(values, mask)]
        return self.spread(values)

    def gradient_mask(self) -> list[bool]:
        """Which parameters have a gradient (the others are left alone, as in torch.optim)."""
        return [p.grad is not None for p in self.params]


def require_graph(loss: Tensor, name: str) -> None:
    """``ValueError`` unless ``loss`` carries the autograd graph a closure must return."""
    if not loss.requires_grad:
        raise ValueError(
            f"Invalid {name}: {loss.item():.6g} has no autograd graph; the closure must "
            "return the loss without calling backward and outside torch.no_grad()"
        )


class HessianVectorProduct:
    """``v -> H v``, ``H`` the Hessian of ``loss`` with respect to ``params``, by double backward.

    The gradient is computed once with ``create_graph=True`` (available, averaged
    across ranks, as :attr:`gradient`); each product differentiates it again
    along ``v`` and keeps the graph, so repeated products at the same point cost
    one backward pass each. Products are averaged across ranks
    (:func:`average_across_ranks`), so every rank must ask for the same products.

    Raises:
        ValueError: the loss has no second derivatives with respect to ``params``
            (its gradient does not depend on them, or an operation in its graph
            cannot be differentiated twice).
    """

    def __init__(self, loss: Tensor, flat: FlatParameters, *, name: str = "loss") -> None:
        require_graph(loss, name)
        self.flat = flat
        self.name = name
        grads = torch.autograd.grad(loss, flat.params, create_graph=True, allow_unused=True)
        self.used = [g is not None for g in grads]
        self.gradient = average_across_ranks(flat.flatten(grads))
        self._differentiable = [
            (i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad
        ]
        if not self._differentiable:
            raise ValueError(
                f"Invalid {name}: {loss.item():.6g} has no second derivatives with respect to the "
                "parameters (its gradient does not depend on them); use a first-order optimizer"
            )
        self.num_products = 0

    def __call__(self, vector: Tensor) -> Tensor:
        """``H @ vector`` as a flat vector."""
        pieces = self.flat.split(vector)
        indices = [i for i, _ in self._differentiable]
        try:
            products = torch.autograd.grad(
                [g for _, g in self._differentiable],
                self.flat.params,
                grad_outputs=[pieces[i] for i in indices],
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError as error:  # e.g. a once_differentiable autograd.Function
            raise ValueError(
                f"Invalid {self.name}: it cannot be differentiated twice ({error})"
            ) from error
        self.num_products += 1
        return average_across_ranks(self.flat.flatten(products))


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        solution: the approximate solution ``x`` of ``A x = b``.
        iterations: products with ``A`` computed.
        relative_residual: ``||b - A x|| / ||b||`` at exit (0 for ``b = 0``).
        negative_curvature: CG met a direction ``p`` with ``p^T A p <= 0`` (or so close
            to 0 that the step along it overflows the dtype) and stopped; ``solution``
            is the iterate before it, or ``b`` itself if that was the first direction
            (for ``b = -g``: the steepest-descent direction).
    """

    solution: Tensor
    iterations: int
    relative_residual: float
    negative_curvature: bool


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], rhs: Tensor, *, tol: float, max_iter: int
) -> CGResult:
    """Solve ``A x = rhs`` from ``x = 0`` by CG; stop at ``||r|| <= tol ||rhs||``, ``max_iter``
    products, or non-positive curvature (Nocedal & Wright, Alg. 7.1)."""
    largest = torch.finfo(rhs.dtype).max
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rr = float(residual.dot(residual))
    rhs_norm = math.sqrt(rr)
    if rhs_norm == 0.0:
        return CGResult(x, 0, 0.0, False)
    for iteration in range(max_iter):
        product = operator(direction)
        curvature = float(direction.dot(product))
        if curvature <= 0.0 or rr / curvature > largest:  # no (representable) positive curvature
            solution = rhs.clone() if iteration == 0 else x
            return CGResult(solution, iteration + 1, math.sqrt(rr) / rhs_norm, True)
        alpha = rr / curvature
        x.add_(direction, alpha=alpha)
        residual.add_(product, alpha=-alpha)
        rr_next = float(residual.dot(residual))
        if math.sqrt(rr_next) <= tol * rhs_norm:
            return CGResult(x, iteration + 1, math.sqrt(rr_next) / rhs_norm, False)
        direction.mul_(rr_next / rr).add_(residual)
        rr = rr_next
    return CGResult(x, max_iter, math.sqrt(rr) / rhs_norm, False)


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of :func:`armijo_backtracking`: the accepted step (0 if none was) and trials."""

    step_size: float
    trials: int
    accepted: bool
    loss: float


def armijo_backtracking(
    loss_at: Callable[[float], float],
    loss: float,
    slope: float,
    *,
    initial: float,
    factor: float,
    sufficient_decrease: float,
    max_trials: int,
) -> LineSearchResult:
    """The largest ``initial * factor^t`` with ``loss_at(a) <= loss + sufficient_decrease * a * slope``.

    ``slope`` is the directional derivative along the step (negative for a descent
    direction). If no trial is accepted within ``max_trials`` the step is 0.
    """
    step = initial
    for trial in range(1, max_trials + 1):
        value = loss_at(step)
        if value <= loss + sufficient_decrease * step * slope:
            return LineSearchResult(step, trial, True, value)
        step *= factor
    return LineSearchResult(0.0, max_trials, False, loss)


#: backtracking halves ~30 times before a step is below float32 resolution
MAX_TRIALS = 30


def line_search(
    flat: FlatParameters,
    closure: Callable[[], Tensor],
    start: Tensor,
    step: Tensor,
    gradient: Tensor,
    decay: Tensor,
    loss: float,
    *,
    factor: float,
    sufficient_decrease: float,
) -> LineSearchResult:
    """:func:`armijo_backtracking` from ``start`` along ``step`` on ``closure()`` (evaluated at
    each trial point, averaged across ranks) plus ``1/2 sum decay w^2``; ``loss`` and
    ``gradient`` are the closure's at ``start`` (the gradient with the decay). Leaves the
    parameters at the accepted point (``start`` if none is)."""

    def objective(point: Tensor) -> float:
        flat.copy_(point)
        value = average_across_ranks(closure().detach().double().clone())
        return float(value) + 0.5 * float((decay * point * point).sum())

    search = armijo_backtracking(
        lambda a: objective(start + a * step),
        loss + 0.5 * float((decay * start * start).sum()),
        float(gradient.dot(step)),
        initial=1.0,
        factor=factor,
        sufficient_decrease=sufficient_decrease,
        max_trials=MAX_TRIALS,
    )
    flat.copy_(start + search.step_size * step)
    return search
