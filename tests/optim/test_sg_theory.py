"""Stochastic gradient on a noisy strongly convex quadratic against the review's theorems.

``F(w) = 1/2 sum_i h_i w_i^2`` with oracle gradient ``H w + sigma z / sqrt(b)``:
``mu = mu_G = M_G = 1``, ``M = sigma^2 d / b``, ``c = min h``, ``L = max h``. The
expected gap follows an exact recursion (research notes A.2), so:

* Monte Carlo runs of ``torch.optim.SGD`` (4,000 replicas in one tensor) match
  the exact curve within their confidence interval, and not the curve of
  another batch size (negative control);
* fixed step (Thm 4.6): the exact curve stays under
  ``aLM/(2c) + (1 - ac)^k (F_1 - F* - aLM/(2c))`` and settles on the noise floor
  ``1/2 sum_i a sigma^2 / (b (2 - a h_i))``, which scales as ``1/b``;
* diminishing steps ``beta / (gamma + k)`` (Thm 4.7): the curve stays under
  ``nu / (gamma + k)`` and its log-log slope is -1; with ``beta c < 1/2`` it is
  ``-2 beta c`` instead (negative control: the review's warning about
  underestimating ``beta``).
"""

from __future__ import annotations

import numpy as np
import torch
from classical_problems import NoisyQuadratic

CURVATURES = [0.5, 1.0, 2.0]
SIGMA = 1.0
REPLICAS = 4000


def simulate(lrs: list[float], batch: int = 1, seed: int = 0) -> np.ndarray:
    """Gaps of every replica after each step of ``torch.optim.SGD`` with learning rates ``lrs``."""
    problem = NoisyQuadratic(CURVATURES, SIGMA, REPLICAS, seed=seed)
    optimizer = torch.optim.SGD(problem.parameters(), lr=lrs[0])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lrs[min(k, len(lrs) - 1)] / lrs[0]
    )
    gaps = [problem.gaps().numpy()]
    for _ in lrs:
        problem.noisy_gradient_(batch)
        optimizer.step()
        scheduler.step()
        gaps.append(problem.gaps().numpy())
    return np.array(gaps)


def within_confidence(gaps: np.ndarray, expected: list[float], at: list[int]) -> bool:
    mean, sem = gaps.mean(axis=1), gaps.std(axis=1) / np.sqrt(gaps.shape[1])
    return all(abs(mean[k] - expected[k]) <= 4 * sem[k] for k in at)


def test_fixed_step_matches_theory_floor_and_theorem_4_6_bound():
    problem = NoisyQuadratic(CURVATURES, SIGMA, 1)
    lr, steps = 0.2, 120
    assert lr <= 1 / problem.L  # the theorem's step ceiling mu / (L M_G)
    for batch in (1, 4):
        exact = problem.expected_gap([lr] * steps, batch=batch)
        noise = problem.noise_variance(batch)
        floor = lr * problem.L * noise / (2 * problem.c)
        bound = [floor + (1 - lr * problem.c) ** k * (exact[0] - floor) for k in range(steps + 1)]
        assert all(e <= b * (1 + 1e-12) for e, b in zip(exact, bound))

        stationary = 0.5 * sum(lr * SIGMA**2 / (batch * (2 - lr * h)) for h in CURVATURES)
        assert abs(exact[-1] - stationary) < 1e-6 * stationary  # the curve reaches the floor
        assert stationary <= floor

        gaps = simulate([lr] * steps, batch=batch)
        checkpoints = [1, 5, 20, 60, steps]
        assert within_confidence(gaps, exact, checkpoints)
        late = gaps[-40:].mean()  # Monte Carlo noise floor, averaged over the last steps
        assert abs(late - stationary) < 0.05 * stationary
        other = problem.expected_gap([lr] * steps, batch=2 * batch)  # negative control
        assert not within_confidence(gaps, other, checkpoints)


def test_diminishing_steps_decay_like_one_over_k():
    problem = NoisyQuadratic(CURVATURES, SIGMA, 1)
    c, L, M = problem.c, problem.L, problem.noise_variance()
    beta = 2 / c  # the review's recommended beta = 2 / (c mu)
    gamma = beta * L - 1  # so that alpha_1 = beta / (gamma + 1) = 1 / L
    steps = 4000
    lrs = [beta / (gamma + k) for k in range(1, steps + 1)]
    exact = np.array(problem.expected_gap(lrs))
    nu = max(beta**2 * L * M / (2 * (beta * c - 1)), (gamma + 1) * exact[0])
    k = np.arange(1, steps + 2)
    assert (exact <= nu / (gamma + k) * (1 + 1e-12)).all()

    tail = slice(400, None)
    slope = np.polyfit(np.log(k[tail]), np.log(exact[tail]), 1)[0]
    assert -1.1 < slope < -0.9, slope
    gaps = simulate(lrs[:1000])
    assert within_confidence(gaps, exact.tolist(), [10, 100, 1000])
    mc_slope = np.polyfit(np.log(k[100:1001]), np.log(gaps[100:1001].mean(axis=1)), 1)[0]
    assert -1.15 < mc_slope < -0.85, mc_slope

    small_beta = 0.25 / c  # negative control: beta c = 1/4 < 1, the slope is -2 beta c = -1/2
    slow = np.array(problem.expected_gap([small_beta / (1 + k) for k in range(1, steps + 1)]))
    slow_slope = np.polyfit(np.log(k[tail]), np.log(slow[tail]), 1)[0]
    assert -0.6 < slow_slope < -0.4, slow_slope
