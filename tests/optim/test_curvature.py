"""Hessian-vector products, truncated CG and Armijo backtracking against closed forms.

* Products equal the review's Example 6.1 (``exp(w1 w2)``) and a dense float64
  Hessian of a small network (``torch.autograd.functional.hessian``); repeated
  products reuse one graph.
* CG: the first iterate is a multiple of the right-hand side, the exact solution
  takes at most ``d`` products (T-16), the relative tolerance is honoured, and
  an indefinite operator triggers the negative-curvature exit.
* Armijo: the accepted step is the largest of the sequence that decreases enough;
  a direction of ascent is refused (step 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from largebatch.optim.curvature import (
    FlatParameters,
    HessianVectorProduct,
    armijo_backtracking,
    conjugate_gradient,
)


def test_product_equals_the_closed_form_of_example_6_1():
    w = nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))
    flat = FlatParameters([{"params": [w]}])
    hessian = HessianVectorProduct(torch.exp(w[0] * w[1]), flat)
    a, b = w.detach()
    e = torch.exp(a * b)
    expected_matrix = e * torch.tensor([[b * b, 1 + a * b], [1 + a * b, a * a]])
    for v in torch.eye(2, dtype=torch.float64):
        torch.testing.assert_close(hessian(v), expected_matrix @ v, rtol=1e-14, atol=0)
    torch.testing.assert_close(hessian.gradient, e * torch.stack([b, a]), rtol=1e-14, atol=0)
    assert hessian.num_products == 2


def test_products_equal_the_dense_hessian_of_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    target = torch.randint(0, 2, (16,))
    params = list(model.parameters())
    flat = FlatParameters([{"params": params[:2]}, {"params": params[2:]}])

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, flat.numels)
        shaped = {
            name: piece.view_as(p) for (name, p), piece in zip(model.named_parameters(), pieces)
        }
        logits = torch.func.functional_call(model, shaped, (x,))
        return nn.functional.cross_entropy(logits, target)

    dense = torch.autograd.functional.hessian(loss_of, flat.vector())
    hessian = HessianVectorProduct(nn.functional.cross_entropy(model(x), target), flat)
    probe = torch.randn(flat.dim, dtype=torch.float64)
    torch.testing.assert_close(hessian(probe), dense @ probe, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hessian(2 * probe), 2 * dense @ probe, rtol=1e-12, atol=1e-12)


def spd(d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return basis @ basis.T + torch.eye(d, dtype=torch.float64)


def test_cg_first_iterate_exact_solution_and_tolerance():
    A, d = spd(6), 6
    b = torch.arange(1.0, d + 1, dtype=torch.float64)
    first = conjugate_gradient(lambda v: A @ v, b, tol=1e-14, max_iter=1).solution
    torch.testing.assert_close(first, (b @ b) / (b @ A @ b) * b)  # a multiple of b
    exact = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=50)
    assert exact.iterations <= d and not exact.negative_curvature
    torch.testing.assert_close(exact.solution, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    loose = conjugate_gradient(lambda v: A @ v, b, tol=0.5, max_iter=50)
    residual = (b - A @ loose.solution).norm() / b.norm()
    assert residual <= 0.5 and loose.relative_residual == pytest.approx(float(residual))
    assert loose.iterations < exact.iterations
    zero = conjugate_gradient(
        lambda v: A @ v, torch.zeros(d, dtype=torch.float64), tol=0.1, max_iter=5
    )
    assert zero.iterations == 0 and not zero.solution.any()


def test_cg_exits_on_negative_curvature():
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)  # the first direction has p^T A p < 0
    first = conjugate_gradient(lambda v: indefinite @ v, b, tol=1e-10, max_iter=10)
    assert first.negative_curvature and first.iterations == 1
    torch.testing.assert_close(first.solution, b)  # steepest descent for b = -g
    A = torch.diag(torch.tensor([1.0, -0.01], dtype=torch.float64))
    b = torch.tensor([1.0, 0.1], dtype=torch.float64)  # positive first, negative second direction
    later = conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=10)
    assert later.negative_curvature and later.iterations == 2
    torch.testing.assert_close(later.solution, (b @ b) / (b @ A @ b) * b)  # the first iterate


def test_cg_treats_curvature_too_small_for_the_dtype_as_none():
    """A direction with positive but tiny curvature: the step along it would overflow float32."""
    A = torch.diag(torch.tensor([1.0, 1e-40]))  # 1e-40 is a float32 denormal
    b = torch.tensor([0.0, 1.0])
    result = conjugate_gradient(lambda v: A @ v, b, tol=1e-6, max_iter=5)
    assert result.negative_curvature and result.iterations == 1
    torch.testing.assert_close(result.solution, b)
    # the same in float64 is representable: CG solves it
    A64 = torch.diag(torch.tensor([1.0, 1e-40], dtype=torch.float64))
    solved = conjugate_gradient(lambda v: A64 @ v, b.double(), tol=1e-6, max_iter=5)
    assert not solved.negative_curvature and solved.solution[1] == pytest.approx(1e40)


def test_armijo_takes_the_largest_step_with_enough_decrease():
    def f(a: float) -> float:  # f(x + a d) along d = -2 from x = 1 for f(x) = x^2
        return (1 - 2 * a) ** 2

    result = armijo_backtracking(
        f, 1.0, -4.0, initial=1.0, factor=0.5, sufficient_decrease=1e-4, max_trials=10
    )
    assert result.accepted and result.step_size == 0.5 and result.trials == 2 and result.loss == 0.0
    tight = armijo_backtracking(
        f, 1.0, -4.0, initial=1.0, factor=0.5, sufficient_decrease=0.9, max_trials=10
    )
    assert tight.step_size == 0.0625  # 1 - 2a <= ... holds first at a = 1/16
    ascent = armijo_backtracking(
        lambda a: 1 + a, 1.0, 1.0, initial=1.0, factor=0.5, sufficient_decrease=1e-4, max_trials=5
    )
    assert not ascent.accepted and ascent.step_size == 0.0 and ascent.trials == 5
    assert math.isclose(ascent.loss, 1.0)
