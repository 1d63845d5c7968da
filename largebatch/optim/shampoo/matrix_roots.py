"""Batched inverse p-th roots of symmetric positive semi-definite matrices.

``inverse_roots(A, p, config)`` returns ``(A + ridge I)^(-1/p)`` for a batch ``A`` of shape
``(B, n, n)``, with ``ridge = relative_epsilon * lambda_max(A)``. Two methods:

* symmetric eigendecomposition (default): robust; a float32 failure is retried in float64;
* coupled Newton iteration (Guo & Higham 2006, as in Anil et al. 2021): matrix products only,
  with the paper's scaling, tolerance stop, iteration cap and stop-when-the-error-grows rule.

Every result carries a per-matrix residual and an ``ok`` flag (finite, residual within its
tolerance). Callers keep their previous root where ``ok`` is False, so a NaN, an eigensolver
error or an inaccurate root never reaches the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.optim.shampoo.config import CoupledNewtonConfig, EighConfig, RootConfig


@dataclass(frozen=True)
class RootResult:
    """Inverse roots of a batch with their quality.

    Attributes:
        roots: ``(B, n, n)`` in the compute dtype; undefined where ``ok`` is False.
        residuals: ``(B,)`` float64 on the CPU: the eigendecomposition's relative backward
            error, or the Newton iteration's final ``max |M - I|``; NaN when the input failed.
        ok: ``(B,)`` bool on the CPU.
        iterations: Newton iterations run (0 for eigh).
    """

    roots: Tensor
    residuals: Tensor
    ok: Tensor
    iterations: int = 0


def inverse_roots(matrices: Tensor, exponent: int, config: RootConfig) -> RootResult:
    """``(A + relative_epsilon * lambda_max(A) I)^(-1/exponent)`` for each ``A`` in a ``(B, n, n)`` batch."""
    if exponent < 1:
        raise ValueError(f"Invalid root exponent: {exponent}")
    matrices = matrices.to(config.compute_dtype)
    if matrices.is_meta:  # no values (shape inference, deferred initialisation): nothing to check
        count = matrices.shape[0]
        return RootResult(
            roots=torch.empty_like(matrices),
            residuals=torch.zeros(count, dtype=torch.float64),
            ok=torch.ones(count, dtype=torch.bool),
        )
    if isinstance(config.method, EighConfig):
        return eigh_inverse_roots(matrices, exponent, config.relative_epsilon, config.method)
    return coupled_newton_inverse_roots(matrices, exponent, config.relative_epsilon, config.method)


def _symmetric_eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Batched ``eigh``; if the batch call raises, decompose one by one and mark failures with NaN."""
    try:
        return torch.linalg.eigh(matrices)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        values = torch.full(
            matrices.shape[:-1], float("nan"), dtype=matrices.dtype, device=matrices.device
        )
        vectors = torch.full_like(matrices, float("nan"))
        for i, matrix in enumerate(matrices):
            try:
                values[i], vectors[i] = torch.linalg.eigh(matrix)
            except RuntimeError:
                continue
        return values, vectors


def _finite_per_matrix(tensor: Tensor) -> Tensor:
    return torch.isfinite(tensor).flatten(1).all(dim=1)


def eigh_inverse_roots(
    matrices: Tensor, exponent: int, relative_epsilon: float, config: EighConfig
) -> RootResult:
    """Inverse roots by eigendecomposition; eigenvalues are clipped at 0 before the ridge."""
    values, vectors = _symmetric_eigh(matrices)
    residuals = _eigh_backward_error(matrices, values, vectors)
    retry = ~(torch.isfinite(residuals) & (residuals <= config.residual_tolerance))
    if config.retry_in_float64 and matrices.dtype != torch.float64 and bool(retry.any()):
        index = retry.nonzero().flatten().to(matrices.device)
        retried = matrices.index_select(0, index).double()
        values64, vectors64 = _symmetric_eigh(retried)
        values = values.index_copy(0, index, values64.to(values.dtype))
        vectors = vectors.index_copy(0, index, vectors64.to(vectors.dtype))
        residuals = residuals.index_copy(
            0, index.cpu(), _eigh_backward_error(retried, values64, vectors64)
        )

    clipped = values.clamp_min(0.0)
    ridge = relative_epsilon * clipped.amax(dim=-1, keepdim=True)
    scales = (clipped + ridge).pow(-1.0 / exponent)
    roots = (vectors * scales.unsqueeze(-2)) @ vectors.mT
    ok = torch.isfinite(residuals) & (residuals <= config.residual_tolerance)
    ok &= _finite_per_matrix(roots).cpu()
    return RootResult(roots=roots, residuals=residuals, ok=ok)


def _eigh_backward_error(matrices: Tensor, values: Tensor, vectors: Tensor) -> Tensor:
    """``||A V - V diag(w)||_F / ||A||_F`` per matrix, float64 on the CPU (NaN if not finite)."""
    difference = matrices @ vectors - vectors * values.unsqueeze(-2)
    norm = torch.linalg.matrix_norm(matrices).clamp_min(torch.finfo(matrices.dtype).tiny)
    return (torch.linalg.matrix_norm(difference) / norm).double().cpu()


def max_eigenvalues(matrices: Tensor, iterations: int) -> Tensor:
    """``lambda_max`` of each PSD matrix by power iteration from a fixed start, shape ``(B,)``.

    The start vector is drawn from a seeded generator so every rank and every rerun gets
    the same estimate (roots must be reproducible across ranks).
    """
    generator = torch.Generator(device=matrices.device).manual_seed(0)
    vector = torch.randn(
        matrices.shape[:-1], generator=generator, dtype=matrices.dtype, device=matrices.device
    ).unsqueeze(-1)
    tiny = torch.finfo(matrices.dtype).tiny
    for _ in range(iterations):
        vector = matrices @ vector
        vector = vector / torch.linalg.vector_norm(vector, dim=-2, keepdim=True).clamp_min(tiny)
    return (vector.mT @ matrices @ vector).flatten()


def coupled_newton_inverse_roots(
    matrices: Tensor, exponent: int, relative_epsilon: float, config: CoupledNewtonConfig
) -> RootResult:
    """Inverse roots by the coupled Newton iteration, each matrix stopped on its own.

    With ``z = (1 + p) / (2 ||A||_F)``, ``X_0 = z^(1/p) I`` and ``M_0 = z A``, iterate
    ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M``; then ``M -> I`` and
    ``X -> A^(-1/p)``. A matrix stops when ``max |M - I| <= tolerance``; when the error
    grows by more than ``max_error_ratio`` it stops too and keeps its previous iterate.
    """
    p = exponent
    size = matrices.shape[-1]
    identity = torch.eye(size, dtype=matrices.dtype, device=matrices.device)
    ridge = relative_epsilon * max_eigenvalues(matrices, config.power_iterations).clamp_min(0.0)
    regularized = matrices + ridge.view(-1, 1, 1) * identity
    z = (1 + p) / (2 * torch.linalg.matrix_norm(regularized))
    root = z.pow(1.0 / p).view(-1, 1, 1) * identity
    m = z.view(-1, 1, 1) * regularized
    error = (m - identity).abs().amax(dim=(-2, -1))
    active = torch.isfinite(error) & (error > config.tolerance)

    iterations = 0
    while iterations < config.max_iterations and bool(active.any()):
        iterations += 1
        t = ((p + 1) * identity - m) / p
        new_root = root @ t
        new_m = torch.linalg.matrix_power(t, p) @ m
        new_error = (new_m - identity).abs().amax(dim=(-2, -1))
        improved = (
            active & torch.isfinite(new_error) & (new_error <= config.max_error_ratio * error)
        )
        keep = improved.view(-1, 1, 1)
        root = torch.where(keep, new_root, root)
        m = torch.where(keep, new_m, m)
        error = torch.where(improved, new_error, error)
        active = improved & (new_error > config.tolerance)

    residuals = error.double().cpu()
    ok = torch.isfinite(residuals) & (residuals <= config.failure_threshold)
    ok &= _finite_per_matrix(root).cpu()
    return RootResult(roots=root, residuals=residuals, ok=ok, iterations=iterations)
