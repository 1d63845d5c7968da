"""The gradient noise scale B_simple on gradients with a known mean and covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.diagnostics import (
    GradientNormRecorder,
    NoiseScaleTracker,
    gradient_sqnorm,
    two_batch_estimates,
)


def test_two_batch_estimates_are_unbiased():
    """Averaged over many draws, the estimates converge to |G|^2 and tr(Sigma)."""
    rng = np.random.default_rng(0)
    dim, b_small, b_big = 20, 4, 64
    G = rng.normal(size=dim)
    variances = rng.uniform(0.5, 2.0, dim)
    draws = 40_000
    small = G + rng.normal(size=(draws, dim)) * np.sqrt(variances / b_small)
    big = G + rng.normal(size=(draws, dim)) * np.sqrt(variances / b_big)
    grad_sqnorm, trace = two_batch_estimates(
        torch.from_numpy((small**2).sum(1)), b_small, torch.from_numpy((big**2).sum(1)), b_big
    )
    assert grad_sqnorm.mean().item() == pytest.approx(G @ G, rel=0.02)
    assert trace.mean().item() == pytest.approx(variances.sum(), rel=0.02)


def test_b_simple_of_synthetic_per_example_gradients_within_ten_percent():
    rng = np.random.default_rng(1)
    dim, b_small, b_big = 30, 16, 256
    G = rng.normal(size=dim)
    G /= np.linalg.norm(G)  # |G|^2 = 1
    factor = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    covariance = factor @ factor.T * 2.0
    truth = np.trace(covariance)  # B_simple = tr(Sigma) / 1
    tracker = NoiseScaleTracker(decay=0.995)
    for _ in range(2000):
        examples = G + rng.normal(size=(b_big, dim)) @ factor.T * np.sqrt(2.0)
        small, big = examples[:b_small].mean(0), examples.mean(0)
        tracker.update(float(small @ small), b_small, float(big @ big), b_big)
    estimate = tracker.estimate()
    assert estimate.b_simple == pytest.approx(truth, rel=0.1)
    assert estimate.grad_sqnorm == pytest.approx(1.0, rel=0.1)
    assert estimate.num_updates == 2000


def test_gradient_accumulation_recipe_measures_b_simple_of_a_real_model():
    """The docstring's single-process recipe on least squares with exact per-example gradients."""
    generator = torch.Generator().manual_seed(0)
    n, dim, micro, steps = 256, 6, 8, 4
    X = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    y = X @ torch.randn(dim, generator=generator, dtype=torch.float64) + torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    model = nn.Linear(dim, 1, bias=False).double()
    per_example = (X @ model.weight.detach().squeeze(0) - y)[:, None] * X  # grad of 0.5 (x.w - y)^2
    mean = per_example.mean(0)
    covariance = (per_example - mean).T @ (per_example - mean) / n  # population covariance
    truth = (torch.trace(covariance) / mean.dot(mean)).item()

    tracker = NoiseScaleTracker(decay=0.998)
    for step in range(1500):
        model.zero_grad()
        indices = torch.randint(0, n, (steps, micro), generator=generator)  # with replacement
        for i, batch in enumerate(indices):
            loss = 0.5 * ((model(X[batch]).squeeze(-1) - y[batch]) ** 2).mean()
            (loss / steps).backward()
            if i == 0:
                small = gradient_sqnorm(model.parameters()) * steps**2
        big = gradient_sqnorm(model.parameters())
        if step == 0:  # the recipe's norms are those of the micro-batch and of the whole batch
            first, whole = per_example[indices[0]].mean(0), per_example[indices.reshape(-1)].mean(0)
            assert small.item() == pytest.approx(first.dot(first).item(), rel=1e-12)
            assert big.item() == pytest.approx(whole.dot(whole).item(), rel=1e-12)
        tracker.update(small, micro, big, steps * micro)
    # 1500 heavy-tailed steps leave about 10% noise (seeds give 0.85 to 1.05 of the truth)
    assert tracker.estimate().b_simple == pytest.approx(truth, rel=0.2)


def test_state_dict_round_trip_and_tensor_inputs():
    tracker = NoiseScaleTracker(decay=0.9)
    for small, big in [(5.0, 2.0), (4.0, 1.5), (6.0, 2.5)]:
        tracker.update(torch.tensor(small), 2, torch.tensor(big), 8)
    clone = NoiseScaleTracker()
    clone.load_state_dict(tracker.state_dict())
    tracker.update(4.5, 2, 2.0, 8)
    clone.update(4.5, 2, 2.0, 8)
    assert clone.estimate() == tracker.estimate()
    # bias-corrected averages of the two-batch estimates, re-derived by hand
    grad_sqnorms = [(8 * b - 2 * s) / 6 for s, b in [(5, 2), (4, 1.5), (6, 2.5), (4.5, 2)]]
    weights = [0.1 * 0.9 ** (3 - i) for i in range(4)]
    expected = sum(w * g for w, g in zip(weights, grad_sqnorms)) / (1 - 0.9**4)
    assert tracker.estimate().grad_sqnorm == pytest.approx(expected, rel=1e-12)


def test_b_simple_is_nan_while_the_signal_estimate_is_not_positive():
    tracker = NoiseScaleTracker()
    tracker.update(1.0, 1, 0.1, 100)  # |G|^2 estimate (10 - 1) / 99 > 0
    assert tracker.estimate().b_simple > 0
    negative = NoiseScaleTracker()
    negative.update(10.0, 1, 0.01, 100)  # (1 - 10) / 99 < 0
    assert np.isnan(negative.estimate().b_simple)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Invalid decay: 1.0"):
        NoiseScaleTracker(decay=1.0)
    with pytest.raises(ValueError, match="b_small=8, b_big=8"):
        two_batch_estimates(1.0, 8, 1.0, 8)
    with pytest.raises(RuntimeError, match="before any update"):
        NoiseScaleTracker().estimate()
    with pytest.raises(ValueError, match="none has a gradient"):
        gradient_sqnorm(nn.Linear(2, 2).parameters())
    with pytest.raises(TypeError, match="expected DistributedDataParallel, got Linear"):
        GradientNormRecorder(nn.Linear(2, 2))
