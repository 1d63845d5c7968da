"""Hessian spectrum and trace from Hessian-vector products.

* :func:`top_eigenvalues`: Lanczos with full re-orthogonalisation. The Krylov
  space holds the top k Ritz pairs together (no deflation loop needed); it stops
  once each wanted pair's residual ``|H u - theta u|`` (known for free from the
  tridiagonal matrix) is below ``tol`` times the largest ``|theta|``. Since
  ``|theta - lambda| <= residual``, that bounds the relative error of the top
  eigenvalue by ``tol``; the actual error is usually far smaller
  (about ``residual**2 / gap``).
* :func:`hutchinson_trace`: ``E[z^T H z] = tr(H)`` for Rademacher probes ``z``,
  with a Student-t confidence interval from the probes' spread.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019,
  PyHessian): Ritz values as nodes and squared first components of the Ritz
  vectors as weights, smoothed with a Gaussian kernel.

Any operator with ``dim``, ``device`` and ``__call__(vector) -> vector`` works;
:class:`~largebatch.diagnostics.hvp.HessianOperator` is the usual one. All
random vectors come from a CPU generator seeded with ``seed``, so every rank of a
distributed run draws the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from largebatch.diagnostics.evaluation import Result


class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors of length ``dim``."""

    dim: int
    device: torch.device

    def __call__(self, vector: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EigenResult(Result):
    """Top (or bottom) eigenvalues and how well they converged.

    ``residuals[i]`` is ``|H u_i - theta_i u_i|`` for the unit Ritz vector
    ``u_i``, an upper bound on ``|theta_i - lambda|`` for some eigenvalue lambda.
    """

    eigenvalues: list[float]
    residuals: list[float]
    num_products: int
    converged: bool
    tol: float
    eigenvectors: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class TraceResult(Result):
    """Hutchinson estimate of ``tr(H)`` with a confidence interval."""

    trace: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    num_products: int


@dataclass
class SpectralDensity(Result):
    """Stochastic Lanczos quadrature: per run, nodes (Ritz values) and weights summing to 1."""

    nodes: np.ndarray
    weights: np.ndarray
    num_products: int

    def density(self, grid: np.ndarray, bandwidth: float) -> np.ndarray:
        """Gaussian-smoothed eigenvalue density on ``grid``, averaged over runs (integrates to 1)."""
        if bandwidth <= 0:
            raise ValueError(f"Invalid bandwidth: {bandwidth}")
        import scipy.stats

        grid = np.asarray(grid, dtype=np.float64)
        kernels = scipy.stats.norm.pdf(grid[:, None, None], loc=self.nodes, scale=bandwidth)
        return (kernels * self.weights).sum(axis=-1).mean(axis=-1)


def _random_vector(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """A Rademacher (+-1) float64 vector from a seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64)
    return (2 * signs - 1).to(device)


class _Lanczos:
    """Lanczos recurrence with full re-orthogonalisation, run one product at a time."""

    def __init__(self, operator: LinearOperator, start: torch.Tensor) -> None:
        self.operator = operator
        self.basis = [start / start.norm()]
        self.alphas: list[float] = []
        self.betas: list[float] = []

    def step(self) -> bool:
        """One product; returns False once the Krylov space is invariant (exact answer)."""
        q = self.basis[-1]
        w = self.operator(q).to(torch.float64)
        alpha = torch.dot(w, q)
        basis = torch.stack(self.basis)
        for _ in range(2):  # twice is enough against loss of orthogonality
            w = w - basis.T @ (basis @ w)
        beta = w.norm()
        self.alphas.append(alpha.item())
        self.betas.append(beta.item())
        scale = max(abs(a) for a in self.alphas) + max(self.betas)
        if beta.item() <= 1e-10 * scale or len(self.basis) == q.numel():
            self.betas[-1] = 0.0
            return False
        self.basis.append(w / beta)
        return True

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of the tridiagonal matrix, residuals."""
        import scipy.linalg

        values, vectors = scipy.linalg.eigh_tridiagonal(
            np.array(self.alphas), np.array(self.betas[:-1])
        )
        return values, vectors, np.abs(self.betas[-1] * vectors[-1, :])


def top_eigenvalues(
    operator: LinearOperator,
    k: int = 1,
    *,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-3,
    max_products: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """The ``k`` largest (or smallest, algebraically) eigenvalues of ``operator``.

    Stops when all ``k`` residuals are at most ``tol * max|theta|`` or after
    ``max_products`` products; ``converged`` says which happened. Eigenvalues are
    ordered from the extreme inwards.
    """
    if not 1 <= k <= operator.dim:
        raise ValueError(f"Invalid k: {k} (operator dimension {operator.dim})")
    if which not in ("largest", "smallest"):
        raise ValueError(f"Invalid which: {which!r} (expected 'largest' or 'smallest')")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}")
    if max_products < k:
        raise ValueError(f"Invalid max_products: {max_products} (must be >= k = {k})")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(operator.dim, generator=generator, dtype=torch.float64).to(operator.device)
    lanczos = _Lanczos(operator, start)
    converged = False
    while True:
        growing = lanczos.step()
        if len(lanczos.alphas) >= k:
            values, vectors, residuals = lanczos.ritz()
            wanted = np.arange(len(values))[::-1][:k] if which == "largest" else np.arange(k)
            converged = bool(np.all(residuals[wanted] <= tol * np.abs(values).max()))
        if converged or not growing or len(lanczos.alphas) >= max_products:
            break
    if len(lanczos.alphas) < k:
        raise RuntimeError(
            f"The Krylov space closed after {len(lanczos.alphas)} products: the start vector "
            f"reaches fewer than k = {k} eigenvalues (try another seed)"
        )
    eigenvectors = None
    if return_eigenvectors:
        basis = torch.stack(lanczos.basis[: len(lanczos.alphas)])
        ritz_vectors = torch.from_numpy(vectors[:, wanted].copy()).to(basis)
        eigenvectors = basis.T @ ritz_vectors
    return EigenResult(
        eigenvalues=values[wanted].tolist(),
        residuals=residuals[wanted].tolist(),
        num_products=len(lanczos.alphas),
        converged=converged,
        tol=tol,
        eigenvectors=eigenvectors,
    )


def hutchinson_trace(
    operator: LinearOperator, num_probes: int = 100, *, confidence: float = 0.95, seed: int = 0
) -> TraceResult:
    """``tr(H)`` as the mean of ``z^T H z`` over Rademacher probes, with a t-interval."""
    if num_probes < 2:
        raise ValueError(f"Invalid num_probes: {num_probes} (need at least 2 for an interval)")
    if not 0 < confidence < 1:
        raise ValueError(f"Invalid confidence: {confidence}")
    import scipy.stats  # imported where used: training imports this package, not scipy

    samples = np.empty(num_probes)
    for i in range(num_probes):
        probe = _random_vector(operator.dim, seed + i, operator.device)
        samples[i] = torch.dot(probe, operator(probe).to(torch.float64)).item()
    mean = samples.mean()
    stderr = samples.std(ddof=1) / math.sqrt(num_probes)
    half_width = scipy.stats.t.ppf(0.5 + confidence / 2, df=num_probes - 1) * stderr
    return TraceResult(
        trace=float(mean),
        stderr=float(stderr),
        ci_low=float(mean - half_width),
        ci_high=float(mean + half_width),
        confidence=confidence,
        num_products=num_probes,
    )


def spectral_density(
    operator: LinearOperator, num_runs: int = 1, num_steps: int = 50, *, seed: int = 0
) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (``num_runs * num_steps`` products)."""
    if num_runs < 1:
        raise ValueError(f"Invalid num_runs: {num_runs}")
    if num_steps < 1:
        raise ValueError(f"Invalid num_steps: {num_steps}")
    steps = min(num_steps, operator.dim)
    nodes = np.zeros((num_runs, steps))
    weights = np.zeros((num_runs, steps))
    products = 0
    for run in range(num_runs):
        lanczos = _Lanczos(operator, _random_vector(operator.dim, seed + run, operator.device))
        while lanczos.step() and len(lanczos.alphas) < steps:
            pass
        values, vectors, _ = lanczos.ritz()
        found = len(values)  # fewer than steps when the Krylov space closed early
        nodes[run, :found] = values
        weights[run, :found] = vectors[0, :] ** 2
        products += found
    return SpectralDensity(nodes=nodes, weights=weights, num_products=products)
