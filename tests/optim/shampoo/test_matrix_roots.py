"""Inverse p-th roots against NumPy's float64 eigendecomposition, and their failure flags."""

import numpy as np
import pytest
import torch

from largebatch.optim.shampoo.config import CoupledNewtonConfig, EighConfig, RootConfig
from largebatch.optim.shampoo.matrix_roots import inverse_roots, max_eigenvalues

CONDITION_NUMBERS = [1.0, 1e2, 1e4, 1e6, 1e8, 1e10]


def random_spd(size: int, condition: float, seed: int) -> np.ndarray:
    """A random SPD matrix with eigenvalues log-spaced from 1 down to 1/condition."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (q * np.logspace(0, -np.log10(condition), size)) @ q.T


def reference_root(matrix: np.ndarray, exponent: int, relative_epsilon: float) -> np.ndarray:
    """(A + relative_epsilon * lambda_max I)^(-1/p) from NumPy's float64 eigh."""
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, 0.0, None)
    values = values + relative_epsilon * values.max()
    return (vectors * values ** (-1.0 / exponent)) @ vectors.T


def relative_errors(
    result: torch.Tensor, matrices: np.ndarray, exponent: int, eps: float
) -> np.ndarray:
    reference = np.stack([reference_root(m, exponent, eps) for m in matrices])
    difference = result.double().numpy() - reference
    return np.linalg.norm(difference, axis=(1, 2)) / np.linalg.norm(reference, axis=(1, 2))


# (method, compute dtype, relative ridge, largest accepted relative error). Without a ridge,
# float64 eigh resolves condition numbers up to 1e10; in float32 the 1e-6 ridge bounds the
# effective condition number near 1e6, which float32 inverts to about 1e-2.
CASES = [
    pytest.param(EighConfig(), torch.float64, 0.0, 1e-6, id="eigh-float64"),
    pytest.param(EighConfig(), torch.float32, 1e-6, 5e-2, id="eigh-float32-ridge"),
    pytest.param(CoupledNewtonConfig(), torch.float64, 1e-6, 1e-5, id="newton-float64-ridge"),
    pytest.param(CoupledNewtonConfig(), torch.float32, 1e-6, 5e-2, id="newton-float32-ridge"),
]


@pytest.mark.parametrize(("method", "dtype", "eps", "tolerance"), CASES)
@pytest.mark.parametrize("exponent", [2, 4, 6])
def test_roots_match_float64_eigh_for_condition_numbers_up_to_1e10(
    method, dtype, eps, tolerance, exponent
):
    matrices = np.stack([random_spd(16, cond, seed) for seed, cond in enumerate(CONDITION_NUMBERS)])
    config = RootConfig(method=method, compute_dtype=dtype, relative_epsilon=eps)
    result = inverse_roots(torch.from_numpy(matrices), exponent, config)

    errors = relative_errors(result.roots, matrices, exponent, eps)
    assert result.roots.dtype == dtype
    assert result.ok.all(), f"rejected: {result.ok}, residuals {result.residuals}"
    assert errors.max() < tolerance, dict(zip(CONDITION_NUMBERS, errors))


def test_coupled_newton_reports_its_residual_and_iterations():
    matrices = np.stack([random_spd(16, cond, seed) for seed, cond in enumerate(CONDITION_NUMBERS)])
    config = RootConfig(method=CoupledNewtonConfig(tolerance=1e-6), compute_dtype=torch.float64)
    result = inverse_roots(torch.from_numpy(matrices), 4, config)

    # The residual is max |X^p A_reg - I|, recomputed here from the returned roots.
    regularized = [m + 1e-6 * np.linalg.eigvalsh(m).max() * np.eye(16) for m in matrices]
    recomputed = [
        np.abs(np.linalg.matrix_power(x, 4) @ a - np.eye(16)).max()
        for x, a in zip(result.roots.numpy(), regularized)
    ]
    print("coupled Newton residuals", result.residuals.tolist(), "iterations", result.iterations)
    assert result.residuals.max() <= 1e-6
    np.testing.assert_allclose(result.residuals.numpy(), recomputed, rtol=0.5, atol=1e-9)
    assert 1 <= result.iterations < 100


def test_newton_stops_when_the_error_grows_and_rejects_the_root():
    # An indefinite matrix: the iteration diverges, so it must stop early and keep the
    # previous iterate, and the result must be flagged as failed.
    matrix = torch.diag(torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)).unsqueeze(0)
    config = RootConfig(
        method=CoupledNewtonConfig(), compute_dtype=torch.float64, relative_epsilon=0.0
    )
    result = inverse_roots(matrix, 4, config)
    assert result.iterations < 10
    assert not result.ok.item()
    assert torch.isfinite(result.roots).all()


def test_a_nan_matrix_is_rejected_without_affecting_its_batch():
    matrices = torch.from_numpy(np.stack([random_spd(8, 1e3, seed) for seed in range(3)]))
    matrices[1, 2, 3] = float("nan")
    for method in (EighConfig(), CoupledNewtonConfig()):
        result = inverse_roots(matrices, 4, RootConfig(method=method, compute_dtype=torch.float64))
        assert result.ok.tolist() == [True, False, True], method
        errors = relative_errors(result.roots[[0, 2]], matrices.numpy()[[0, 2]], 4, 1e-6)
        assert errors.max() < 1e-5


def test_an_eigensolver_error_is_a_flagged_failure(monkeypatch):
    def failing_eigh(matrices):
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    result = inverse_roots(torch.eye(4).repeat(2, 1, 1), 4, RootConfig())
    assert result.ok.tolist() == [False, False]
    assert torch.isnan(result.residuals).all()


def test_float32_failure_is_retried_in_float64(monkeypatch):
    real_eigh = torch.linalg.eigh
    calls = []

    def eigh_failing_in_float32(matrices):
        calls.append(matrices.dtype)
        if matrices.dtype == torch.float32:
            raise torch.linalg.LinAlgError("float32 failure")
        return real_eigh(matrices)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    matrices = torch.from_numpy(np.stack([random_spd(8, 1e2, seed) for seed in range(2)]))
    result = inverse_roots(matrices, 4, RootConfig(compute_dtype=torch.float32))
    assert torch.float64 in calls
    assert result.ok.all()
    assert result.roots.dtype == torch.float32
    assert relative_errors(result.roots, matrices.numpy(), 4, 1e-6).max() < 1e-5


def test_a_singular_matrix_without_ridge_is_rejected_not_infinite():
    singular = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)).unsqueeze(0)
    result = inverse_roots(
        singular, 4, RootConfig(compute_dtype=torch.float64, relative_epsilon=0.0)
    )
    assert not result.ok.item()
    with_ridge = inverse_roots(
        singular, 4, RootConfig(compute_dtype=torch.float64, relative_epsilon=1e-6)
    )
    assert with_ridge.ok.item()


def test_power_iteration_finds_lambda_max():
    matrices = np.stack([random_spd(12, cond, seed) for seed, cond in enumerate([1e1, 1e3])])
    scaled = matrices * np.array([3.0, 0.5])[:, None, None]
    estimate = max_eigenvalues(torch.from_numpy(scaled), iterations=100)
    np.testing.assert_allclose(estimate.numpy(), [3.0, 0.5], rtol=1e-6)


def test_invalid_exponent_and_configs_raise_naming_the_value():
    with pytest.raises(ValueError, match="exponent: 0"):
        inverse_roots(torch.eye(2).unsqueeze(0), 0, RootConfig())
    with pytest.raises(ValueError, match="relative_epsilon: -1"):
        RootConfig(relative_epsilon=-1.0)
    with pytest.raises(ValueError, match="compute_dtype: torch.float16"):
        RootConfig(compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="max_iterations: 0"):
        CoupledNewtonConfig(max_iterations=0)
    with pytest.raises(ValueError, match="residual_tolerance: 0"):
        EighConfig(residual_tolerance=0.0)


@pytest.mark.parametrize("method", [EighConfig(), CoupledNewtonConfig()], ids=["eigh", "newton"])
def test_matrices_without_values_get_roots_of_their_shape_and_no_checks(method):
    result = inverse_roots(torch.empty(3, 5, 5, device="meta"), 4, RootConfig(method=method))
    assert result.roots.is_meta and result.roots.shape == (3, 5, 5)
    assert result.ok.tolist() == [True] * 3  # nothing to reject: installing them is harmless
