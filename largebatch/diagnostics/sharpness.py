"""Epsilon-sharpness of Keskar et al. (2017), Metric 2.1.

For weights ``x``, a matrix ``A`` (n x p) and ``eps``, the box
``C = {y : |y_i| <= eps * (|(A+ x)_i| + 1)}`` (``A+`` the pseudo-inverse) and

    sharpness = 100 * (max_{y in C} f(x + A y) - f(x)) / (1 + f(x)),

the relative rise of the training loss in percent. ``A = I`` is the full space;
a random Gaussian ``A`` with p = 100 columns is the paper's random subspace.
The maximisation is inexact: ``max_iter`` iterations (10 in the paper) of
scipy's L-BFGS-B on ``-f``, with gradients ``A^T grad f`` from autograd.

The trap: at an exact minimiser the gradient at ``y = 0`` is zero, so L-BFGS-B
started there stops at once and reports 0. We start from a seeded random point
inside the box (``start="random"``, the default); ``start="zero"`` reproduces the
paper's literal recipe, which is fine only at noisy (non-stationary) SGD endpoints.

Implementation choices (the paper leaves them open): the optimiser works in box
coordinates ``u = y / bound`` in ``[-1, 1]^p`` with the objective scaled so that
its largest gradient entry at the start is 1, which lets the first L-BFGS-B
steps reach the faces of the box whatever the loss scale; ``f`` is evaluated on
the given fixed data (use :func:`~largebatch.diagnostics.evaluation.fixed_subset`
of the training set) in eval mode unless ``train=True``; the reported maximum is
the largest loss seen, never below ``f(x)`` (``y = 0`` is feasible).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from largebatch.diagnostics.evaluation import (
    Batches,
    LossFn,
    Result,
    check_batches,
    fixed_function,
    flatten,
    loss_and_gradient,
    trainable_parameters,
    unflatten,
    unwrap,
)

# The objective is scaled so that L-BFGS-B's first (unit, projected-gradient) step
# moves every box coordinate whose slope is at least this fraction of the largest
# by half the box width or more: a convex bump is maximised at a corner, and
# without it L-BFGS-B (whose curvature updates are skipped on concave-for-it
# objectives) would creep towards the corner by plain gradient steps.
SLOPE_RATIO = 1e-3


@dataclass
class SharpnessResult(Result):
    """One sharpness value and how it was obtained.

    ``subspace_dim`` is ``None`` for the full space (A = I). ``loss`` is f(x) and
    ``max_loss`` the largest f(x + A y) found in the box.
    """

    sharpness: float
    epsilon: float
    subspace_dim: int | None
    loss: float
    max_loss: float
    num_iterations: int
    num_evaluations: int
    start: str
    seed: int
    message: str
    wall_time_s: float


def random_subspace(
    dim: int, subspace_dim: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``dim x subspace_dim`` random matrix A used for ``seed`` (float64).

    Entries are Gaussian with variance ``1 / dim``, so columns have unit norm on
    average and are nearly orthonormal for ``subspace_dim << dim``: the subspace
    metric then perturbs weights on the same scale as the full-space one (A = I
    is the orthonormal case). With unit-variance entries perturbations would be
    ``sqrt(dim)`` times larger. A is held in memory: ``8 * dim * subspace_dim``
    bytes (80 MB for 100k weights at p = 100).
    """
    if subspace_dim < 1:
        raise ValueError(f"Invalid subspace_dim: {subspace_dim}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, subspace_dim, generator=generator, dtype=torch.float64)
    return (gaussian / dim**0.5).to(device)


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    max_iter: int = 10,
    start: Literal["random", "zero"] = "random",
    seed: int = 0,
    train: bool = False,
    params: Iterable[nn.Parameter] | None = None,
) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness of ``model`` on fixed ``batches``.

    Args:
        epsilon: box size; the paper uses 1e-3 and 5e-4.
        subspace_dim: ``None`` for the full space, else p for a random n x p
            subspace (the paper uses 100); A is :func:`random_subspace` with ``seed``.
        max_iter: L-BFGS-B iterations (10 in the paper).
        start: ``"random"`` (uniform in the box, seeded) or ``"zero"`` (see the
            module docstring for why zero reports 0 at an exact minimiser).
        seed: seeds the start point, the subspace and dropout (in train mode).
        train: evaluate the loss in train mode; eval mode by default.
        params: the weights to perturb (default: all that require grad).

    The model's weights are restored on return.
    """
    if not epsilon > 0:
        raise ValueError(f"Invalid epsilon: {epsilon}")
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter}")
    if start not in ("random", "zero"):
        raise ValueError(f"Invalid start: {start!r} (expected 'random' or 'zero')")
    import scipy.optimize  # imported where used: training imports this package, not scipy

    began = time.perf_counter()
    model = unwrap(model)
    params = trainable_parameters(model, params)
    check_batches(batches)
    with torch.no_grad():
        origin = flatten(params).double()
    basis = None
    coordinates = origin
    if subspace_dim is not None:
        basis = random_subspace(origin.numel(), subspace_dim, seed=seed, device=origin.device)
        coordinates = torch.linalg.lstsq(basis, origin.unsqueeze(1)).solution.squeeze(1)
    bound = epsilon * (coordinates.abs() + 1)

    def loss_and_box_gradient(u: np.ndarray) -> tuple[float, np.ndarray]:
        """f(x + A (bound * u)) and its gradient with respect to u."""
        step = bound * torch.from_numpy(u).to(bound)
        with torch.no_grad():
            weights = origin + (step if basis is None else basis @ step)
            for param, value in zip(params, unflatten(weights, params)):
                param.copy_(value)
        with fixed_function(model, train=train, seed=seed):
            loss, grad = loss_and_gradient(model, loss_fn, batches, params)
        box_grad = bound * (grad if basis is None else basis.T @ grad)
        return loss.item(), box_grad.cpu().numpy()

    dim = bound.numel()
    try:
        at_origin = loss_and_box_gradient(np.zeros(dim))
        objective = _RiseObjective(loss_and_box_gradient, at_origin)
        u0 = (
            np.random.default_rng(seed).uniform(-1.0, 1.0, dim)
            if start == "random"
            else np.zeros(dim)
        )
        outcome = scipy.optimize.minimize(
            objective,
            u0,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-np.ones(dim), np.ones(dim)),
            options={"maxiter": max_iter},
        )
    finally:
        with torch.no_grad():
            for param, value in zip(params, unflatten(origin, params)):
                param.copy_(value)
    loss_at_x = at_origin[0]
    max_loss = objective.max_loss
    return SharpnessResult(
        sharpness=100.0 * (max_loss - loss_at_x) / (1.0 + loss_at_x),
        epsilon=epsilon,
        subspace_dim=subspace_dim,
        loss=loss_at_x,
        max_loss=max_loss,
        num_iterations=int(outcome.nit),
        num_evaluations=objective.num_evaluations,
        start=start,
        seed=seed,
        message=str(outcome.message),
        wall_time_s=time.perf_counter() - began,
    )


class _RiseObjective:
    """``-(f(u) - f(0)) * scale`` and its gradient for scipy, remembering the largest f seen.

    ``scale`` is fixed at the first (start) point: see :data:`SLOPE_RATIO`.
    """

    def __init__(
        self,
        loss_and_gradient: Callable[[np.ndarray], tuple[float, np.ndarray]],
        at_origin: tuple[float, np.ndarray],
    ) -> None:
        self.loss_and_gradient = loss_and_gradient
        self.baseline = at_origin[0]
        self.max_loss = at_origin[0]
        self.num_evaluations = 1
        self.scale: float | None = None
        self._last: tuple[np.ndarray, tuple[float, np.ndarray]] = (
            np.zeros_like(at_origin[1]),
            at_origin,
        )

    def __call__(self, u: np.ndarray) -> tuple[float, np.ndarray]:
        if not np.array_equal(u, self._last[0]):
            self._last = (u.copy(), self.loss_and_gradient(u))
            self.num_evaluations += 1
        loss, grad = self._last[1]
        self.max_loss = max(self.max_loss, loss)
        if self.scale is None:
            largest_slope = np.abs(grad).max()
            self.scale = 1.0 / (SLOPE_RATIO * largest_slope) if largest_slope > 0 else 1.0
        return -self.scale * (loss - self.baseline), -self.scale * grad
