"""Keskar et al.'s epsilon-sharpness against closed forms on quadratics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.diagnostics import epsilon_sharpness, random_subspace


class Point(nn.Module):
    """A 'network' whose output is its weight vector, so the loss is any function of the weights."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = nn.Parameter(weights.clone())

    def forward(self, _inputs):
        return self.weights


def quadratic(n=50, seed=0, f0=0.3, spread=(0.5, 2.0)):
    """``f(x) = f0 + 0.5 sum d_i (x_i - xhat_i)^2`` at its minimiser ``x = xhat``."""
    rng = np.random.default_rng(seed)
    xhat = torch.from_numpy(rng.normal(0.0, 2.0, n))
    d = torch.from_numpy(rng.uniform(*spread, n))

    def loss_fn(weights, target):
        return f0 + 0.5 * (d * (weights - target) ** 2).sum()

    return Point(xhat), loss_fn, [(torch.zeros(1), xhat)], xhat.numpy(), d.numpy(), f0


def closed_form(d, xhat, eps, f0):
    return 100 * 0.5 * np.sum(d * eps**2 * (np.abs(xhat) + 1) ** 2) / (1 + f0)


@pytest.mark.parametrize("epsilon", [1e-3, 5e-4])
@pytest.mark.parametrize("curvature_scale", [1e-3, 1.0, 1e3])
def test_full_space_sharpness_of_a_diagonal_quadratic(epsilon, curvature_scale):
    model, loss_fn, batches, xhat, d, f0 = quadratic(
        spread=(0.5 * curvature_scale, 2 * curvature_scale)
    )
    result = epsilon_sharpness(model, loss_fn, batches, epsilon=epsilon)
    assert result.sharpness == pytest.approx(closed_form(d, xhat, epsilon, f0), rel=1e-2)
    assert result.loss == pytest.approx(f0)
    assert result.num_iterations <= 10
    torch.testing.assert_close(model.weights.detach(), torch.from_numpy(xhat), rtol=0, atol=0)


def test_sharpness_scales_with_epsilon_squared_and_ignores_coordinate_order():
    model, loss_fn, batches, xhat, d, f0 = quadratic(seed=1)
    big = epsilon_sharpness(model, loss_fn, batches, epsilon=1e-3).sharpness
    small = epsilon_sharpness(model, loss_fn, batches, epsilon=5e-4).sharpness
    assert big / small == pytest.approx(4.0, rel=1e-3)
    order = np.random.default_rng(0).permutation(len(xhat))
    perm = torch.from_numpy(order)
    shuffled = epsilon_sharpness(
        Point(torch.from_numpy(xhat)[perm]),
        lambda w, t: f0 + 0.5 * (torch.from_numpy(d)[perm] * (w - t) ** 2).sum(),
        [(torch.zeros(1), torch.from_numpy(xhat)[perm])],
        epsilon=1e-3,
    ).sharpness
    assert shuffled == pytest.approx(big, rel=1e-6)


def test_zero_start_at_an_exact_minimiser_reports_zero():
    """The trap of the metric: the gradient vanishes at y = 0, so L-BFGS-B never moves."""
    model, loss_fn, batches, *_ = quadratic()
    result = epsilon_sharpness(model, loss_fn, batches, start="zero")
    assert result.sharpness == 0.0
    assert result.num_iterations == 0


def test_random_subspace_sharpness_reaches_the_best_box_vertex():
    """With A random, f(x + A y) is a convex quadratic in y: its box maximum is at a vertex."""
    p = 4
    model, loss_fn, batches, xhat, d, f0 = quadratic(n=30, seed=2)
    result = epsilon_sharpness(model, loss_fn, batches, epsilon=1e-2, subspace_dim=p, seed=5)
    A = random_subspace(len(xhat), p, seed=5).numpy()
    bound = 1e-2 * (np.abs(np.linalg.pinv(A) @ xhat) + 1)
    curvature = A.T @ np.diag(d) @ A
    best = max(
        0.5 * (np.array(signs) * bound) @ curvature @ (np.array(signs) * bound)
        for signs in itertools.product([-1, 1], repeat=p)
    )
    assert result.sharpness == pytest.approx(100 * best / (1 + f0), rel=1e-2)
    assert result.subspace_dim == p


def test_interior_maximum_is_found_too():
    """A concave bump peaking inside the box: the maximiser must stop short of the corners."""
    n = 20
    rng = np.random.default_rng(3)
    xhat = torch.from_numpy(rng.normal(0.0, 1.0, n))
    d = torch.from_numpy(rng.uniform(0.5, 2.0, n))
    peak = torch.from_numpy(rng.uniform(-0.5, 0.5, n)) * 1e-3 * (xhat.abs() + 1)  # inside the box
    f0 = 0.2
    rise = 0.5 * (d * peak**2).sum()

    def loss_fn(weights, target):
        return f0 + rise - 0.5 * (d * (weights - target - peak) ** 2).sum()

    result = epsilon_sharpness(Point(xhat), loss_fn, [(torch.zeros(1), xhat)])
    assert result.sharpness == pytest.approx(100 * rise.item() / (1 + f0), rel=1e-2)


def test_sharpness_is_never_negative_and_matches_its_fields():
    model, loss_fn, batches, *_ = quadratic(seed=4)
    result = epsilon_sharpness(model, loss_fn, batches, subspace_dim=3, max_iter=1)
    assert result.sharpness >= 0
    assert result.sharpness == pytest.approx(
        100 * (result.max_loss - result.loss) / (1 + result.loss)
    )
    assert set(result.to_dict()) >= {"sharpness", "epsilon", "subspace_dim", "num_evaluations"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "Invalid epsilon: 0.0"),
        ({"max_iter": 0}, "Invalid max_iter: 0"),
        ({"start": "centre"}, "Invalid start: 'centre'"),
        ({"subspace_dim": 0}, "Invalid subspace_dim: 0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    model, loss_fn, batches, *_ = quadratic(n=5)
    with pytest.raises(ValueError, match=message):
        epsilon_sharpness(model, loss_fn, batches, **kwargs)
