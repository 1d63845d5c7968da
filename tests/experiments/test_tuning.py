"""The learning-rate tuner on problems whose best learning rate is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from largebatch.experiments.tuning import FAILED, grid_ratio, settle, tune

CURVATURE = 4.0  # f(x) = h/2 |x|^2: gradient descent converges in one step at lr = 1/h
BEST = 1 / CURVATURE


def quadratic_loss_after_training(lr: float, steps: int = 5) -> float:
    """Train f(x) = h/2 |x|^2 with torch.optim.SGD from x0 = (1, -2, 3); the final loss.

    After T steps x_T = (1 - lr h)^T x0, so the loss is f(x0) (1 - lr h)^(2T): zero at
    lr = 1/h, equal to f(x0) at lr = 2/h, growing without bound beyond.
    """
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (CURVATURE / 2 * x.pow(2).sum()).backward()
        optimizer.step()
    return (CURVATURE / 2 * x.pow(2).sum()).item()


def test_training_matches_the_closed_form():
    """The objective the tuner sees is the textbook rate (so the known optimum is 1/h)."""
    for lr in (0.05, BEST, 0.4):
        expected = CURVATURE / 2 * 14 * (1 - lr * CURVATURE) ** 10
        assert quadratic_loss_after_training(lr) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_picks_the_known_best_learning_rate_inside_the_grid():
    state = tune(quadratic_loss_after_training, [BEST / 4, BEST / 2, BEST, 2 * BEST, 4 * BEST])
    assert state.chosen == BEST and state.at_edge is None and state.extensions == 0


def test_extends_a_grid_whose_best_value_sits_on_the_high_edge():
    """All of [1/64, 1/32, 1/16] are too small: the grid grows upwards until 1/4 is interior."""
    state = tune(quadratic_loss_after_training, [1 / 64, 1 / 32, 1 / 16], max_extensions=4)
    assert state.chosen == BEST
    assert state.grid == (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # ratio 2 kept
    assert state.extensions == 3 and state.at_edge is None


def test_extends_a_grid_whose_best_value_sits_on_the_low_edge():
    """All of [1, 2, 4] blow up (lr h > 2): the grid grows downwards past 1/4."""
    state = tune(quadratic_loss_after_training, [1.0, 2.0, 4.0], max_extensions=4)
    assert state.chosen == BEST
    assert state.grid[:4] == (1 / 8, 1 / 4, 1 / 2, 1.0)
    assert state.at_edge is None


def test_without_extensions_the_edge_is_reported_not_hidden():
    """Negative control: with no extension allowed the choice stays at the edge, and says so."""
    state = tune(quadratic_loss_after_training, [1 / 64, 1 / 32, 1 / 16], max_extensions=0)
    assert state.chosen == 1 / 16 and state.at_edge == "high" and state.chosen != BEST


def test_failures_count_as_worst_and_all_failing_steps_down():
    def diverges_above(lr: float) -> float:
        return math.inf if lr > 0.01 else (lr - 0.003) ** 2

    state = tune(diverges_above, [0.1, 0.2, 0.4, 0.8], max_extensions=10)
    assert state.chosen == pytest.approx(0.003125)  # 0.1 / 2**5: nearest to 0.003 on the grid
    assert state.at_edge is None


def test_settle_is_a_replay_of_recorded_scores():
    """Half-measured: asks for what is missing; a plateau of ties is not an edge."""
    grid = [0.1, 0.3, 0.9]
    first = settle(grid, {0.1: (1, 0.5)})
    assert first.missing == (0.3, 0.9) and not first.settled and first.chosen is None
    plateau = settle(grid, {0.1: (1, 1.0), 0.3: (1, 1.0), 0.9: (1, 0.2)})
    assert plateau.chosen == 0.3 and plateau.at_edge is None
    edge = settle(grid, {0.1: (1, 0.2), 0.3: (1, 0.5), 0.9: (1, 0.9)})
    assert edge.missing == (pytest.approx(2.7),) and edge.grid[-1] == 0.9 * grid_ratio(grid)
    failed = settle(grid, dict.fromkeys(grid, FAILED))
    assert failed.missing == (pytest.approx(0.1 / 3),)


@pytest.mark.parametrize("grid", [[0.1], [0.1, 0.1], [0.0, 0.1], [-1.0, 0.1]])
def test_bad_grids_are_rejected(grid):
    with pytest.raises(ValueError, match="Invalid learning-rate grid"):
        settle(grid, {})
