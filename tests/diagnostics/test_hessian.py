"""Hessian-vector products, Lanczos eigenvalues, Hutchinson trace and SLQ against known Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.diagnostics import (
    HessianOperator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)


def half_mse(outputs, targets):
    return 0.5 * ((outputs.squeeze(-1) - targets) ** 2).mean()


def least_squares(n=300, d=40, seed=0):
    """A linear model whose loss has the exact Hessian X^T X / n."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64) * scales
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    batches = [(X[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]  # uneven last batch
    return model, batches, (X.T @ X / n).numpy()


class MatrixOperator:
    """A plain symmetric matrix as an operator, to test the algorithms alone."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = torch.from_numpy(matrix)
        self.dim = matrix.shape[0]
        self.device = torch.device("cpu")

    def __call__(self, vector):
        return self.matrix @ vector


def known_spectrum(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T


def test_hvp_matches_explicit_hessian_of_a_nonlinear_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    loss_fn = nn.functional.cross_entropy
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
        return loss_fn(torch.func.functional_call(model, params, (X,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    operator = HessianOperator(model, loss_fn, [(X[:7], y[:7]), (X[7:], y[7:])])
    v = torch.randn(flat.numel(), dtype=torch.float64)
    torch.testing.assert_close(operator(v), hessian @ v, rtol=1e-10, atol=1e-12)
    assert operator.num_products == 1


def test_top5_eigenvalues_of_least_squares_match_eigvalsh():
    model, batches, hessian = least_squares()
    result = top_eigenvalues(HessianOperator(model, half_mse, batches), k=5, tol=1e-4)
    expected = np.linalg.eigvalsh(hessian)[::-1][:5]
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-3)
    assert result.num_products < 40  # the 40-dim Krylov space would give it exactly
    assert all(r <= 1e-4 * expected[0] for r in result.residuals)


def test_eigenvectors_satisfy_the_eigen_equation():
    matrix = known_spectrum(np.linspace(-3.0, 5.0, 30))
    result = top_eigenvalues(MatrixOperator(matrix), k=2, tol=1e-8, return_eigenvectors=True)
    vectors = result.eigenvectors.numpy()
    np.testing.assert_allclose(matrix @ vectors, vectors * np.array(result.eigenvalues), atol=1e-6)
    assert "eigenvectors" not in result.to_dict()


def test_smallest_eigenvalues_of_an_indefinite_matrix():
    eigenvalues = np.array([-4.0, -2.5, -1.0, 0.5, 1.0, 2.0, 3.0] + [0.1] * 23)
    result = top_eigenvalues(
        MatrixOperator(known_spectrum(eigenvalues)), k=2, which="smallest", tol=1e-8
    )
    np.testing.assert_allclose(result.eigenvalues, [-4.0, -2.5], rtol=1e-6)


def test_iteration_cap_reports_not_converged():
    eigenvalues = np.linspace(1.0, 1.05, 200)  # clustered: slow convergence
    result = top_eigenvalues(MatrixOperator(known_spectrum(eigenvalues)), tol=1e-12, max_products=5)
    assert not result.converged
    assert result.num_products == 5
    assert result.eigenvalues[0] <= 1.05 + 1e-12


def test_hutchinson_trace_interval_covers_the_trace_and_matches_theory():
    model, batches, hessian = least_squares()
    result = hutchinson_trace(HessianOperator(model, half_mse, batches), num_probes=200, seed=3)
    assert result.ci_low <= np.trace(hessian) <= result.ci_high
    # Var(z^T H z) = 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher z
    theory = np.sqrt(2 * ((hessian**2).sum() - (np.diag(hessian) ** 2).sum()) / 200)
    assert result.stderr == pytest.approx(theory, rel=0.25)
    assert result.num_products == 200


def test_hutchinson_interval_coverage_over_seeds():
    matrix = known_spectrum(np.linspace(0.0, 2.0, 25))
    operator = MatrixOperator(matrix)
    covered = [
        (r.ci_low <= np.trace(matrix) <= r.ci_high)
        for r in (hutchinson_trace(operator, 30, confidence=0.9, seed=100 * s) for s in range(60))
    ]
    assert 0.75 <= np.mean(covered) <= 1.0


def test_spectral_density_quadrature_is_exact_on_a_small_matrix():
    eigenvalues = np.array([-1.0, 0.5, 2.0, 3.0, 7.0])
    operator = MatrixOperator(known_spectrum(eigenvalues))
    density = spectral_density(operator, num_runs=3, num_steps=10, seed=1)
    assert density.num_products == 15  # the Krylov space closes after 5 products per run
    for nodes, weights in zip(density.nodes, density.weights):
        np.testing.assert_allclose(np.sort(nodes), eigenvalues, atol=1e-8)
        assert weights.sum() == pytest.approx(1.0)
    grid = np.linspace(-5.0, 12.0, 2001)
    smooth = density.density(grid, bandwidth=0.1)
    assert np.trapezoid(smooth, grid) == pytest.approx(1.0, abs=1e-6)


def test_spectral_density_first_moment_equals_rademacher_quadratic_form():
    matrix = known_spectrum(np.linspace(-1.0, 4.0, 60), seed=2)
    density = spectral_density(MatrixOperator(matrix), num_runs=1, num_steps=8, seed=5)
    generator = torch.Generator().manual_seed(5)
    z = (2 * torch.randint(0, 2, (60,), generator=generator, dtype=torch.float64) - 1).numpy()
    first_moment = (density.weights[0] * density.nodes[0]).sum()
    assert first_moment == pytest.approx(z @ matrix @ z / 60, rel=1e-10)


def test_train_mode_is_a_fixed_symmetric_operator_and_restores_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).double()
    model.eval()
    X = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    buffers = [b.clone() for b in model.buffers()]
    operator = HessianOperator(model, nn.functional.cross_entropy, [(X, y)], train=True, seed=7)
    u, v = torch.randn(2, operator.dim, dtype=torch.float64)
    hv = operator(v)
    torch.testing.assert_close(operator(v), hv, rtol=0, atol=0)  # same dropout mask every time
    assert torch.dot(u, hv).item() == pytest.approx(torch.dot(operator(u), v).item(), rel=1e-9)
    for before, after in zip(buffers, model.buffers()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not model.training
    eval_product = HessianOperator(model, nn.functional.cross_entropy, [(X, y)])(v)
    assert not torch.allclose(eval_product, hv)  # the two modes are different functions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "Invalid k: 0"),
        ({"which": "middle"}, "Invalid which: 'middle'"),
        ({"tol": 0.0}, "Invalid tol: 0.0"),
        ({"k": 3, "max_products": 2}, "Invalid max_products: 2"),
    ],
)
def test_top_eigenvalues_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        top_eigenvalues(MatrixOperator(np.eye(4)), **kwargs)


def test_bad_inputs_raise_clear_errors():
    model, batches, _ = least_squares(n=10, d=3)
    operator = HessianOperator(model, half_mse, batches)
    with pytest.raises(ValueError, match=r"Invalid vector shape: \(4,\)"):
        operator(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(model, half_mse, iter(batches))
    with pytest.raises(ValueError, match="Invalid num_probes: 1"):
        hutchinson_trace(operator, num_probes=1)
    with pytest.raises(ValueError, match="Invalid confidence: 1.5"):
        hutchinson_trace(operator, confidence=1.5)
