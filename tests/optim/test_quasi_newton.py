"""oLBFGS and SQN against the BFGS algebra, torch.optim.LBFGS and the skip rule.

* The two-loop recursion equals the explicit BFGS inverse-Hessian recursion
  (review eq. 6.11) applied to ``gamma I`` (float64, T-17), satisfies the secant
  equation, and depends on the pair order (negative control).
* Full batch, oLBFGS reaches the optimum ``torch.optim.LBFGS`` finds on
  L2-regularised logistic regression, to 1e-8. (Both take unit steps: a line
  search that compares losses stops near gradients of 1e-10 here, where the
  decrease drops below float64 resolution, which leaves ``w*`` good to 1e-8 only.)
* Full batch, L-BFGS with Armijo backtracking reaches the same optimum to 1e-8,
  faster than oLBFGS's fixed step, and through its line search.
* A pair with non-positive curvature is skipped (and stored once damping makes
  its curvature positive); the memory keeps the newest ``memory`` stored pairs
  in order, skipped ones taking no slot.
* SQN's pairs are Hessian-vector products at the averaged iterates; with exact
  pairs it beats gradient descent on an ill-conditioned quadratic by orders of
  magnitude.
* State round-trips; bad input raises ``ValueError`` naming the value.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from classical_problems import LogReg, flat_weights
from torch import nn

from largebatch.optim.curvature import FlatParameters
from largebatch.optim.quasi_newton import LBFGS, OLBFGS, SQN, two_loop_recursion

WD = 1e-2


def dense_bfgs_inverse(s: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """``H_k`` by the explicit recursion ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T``."""
    d = s.shape[1]
    H = gamma * np.eye(d)
    for si, yi in zip(s, y):
        rho = 1.0 / (si @ yi)
        left = np.eye(d) - rho * np.outer(si, yi)
        H = left @ H @ left.T + rho * np.outer(si, si)
    return H


def curvature_pairs(count: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=generator, dtype=torch.float64)
    hessian = basis @ basis.T + 0.1 * torch.eye(d, dtype=torch.float64)
    s = torch.randn(count, d, generator=generator, dtype=torch.float64)
    return s, s @ hessian  # y_i = H s_i: positive curvature


def test_two_loop_recursion_equals_the_dense_bfgs_matrix():
    s, y = curvature_pairs(5, 8)
    gradient = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gamma = float(s[-1] @ y[-1] / (y[-1] @ y[-1]))
    expected = dense_bfgs_inverse(s.numpy(), y.numpy(), gamma) @ gradient.numpy()
    np.testing.assert_allclose(two_loop_recursion(gradient, s, y).numpy(), expected, rtol=1e-12)
    # the secant equation H_k y_{k-1} = s_{k-1}
    torch.testing.assert_close(two_loop_recursion(y[-1], s, y), s[-1], rtol=1e-12, atol=1e-12)
    # explicit gamma and no pairs
    np.testing.assert_allclose(
        two_loop_recursion(gradient, s, y, gamma=2.0).numpy(),
        dense_bfgs_inverse(s.numpy(), y.numpy(), 2.0) @ gradient.numpy(),
        rtol=1e-12,
    )
    torch.testing.assert_close(two_loop_recursion(gradient, s[:0], y[:0]), gradient)
    # negative control: the same pairs in another order give another matrix
    shuffled = two_loop_recursion(gradient, s.flip(0), y.flip(0), gamma=gamma).numpy()
    assert np.abs(shuffled - expected).max() > 1e-3 * np.abs(expected).max()


@pytest.fixture(scope="module")
def problem() -> LogReg:
    return LogReg(num_train=200, num_features=20, weight_decay=WD)


def torch_lbfgs_solution(problem: LogReg) -> torch.Tensor:
    model = problem.model()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        history_size=10,
        tolerance_grad=1e-15,
        tolerance_change=0.0,
        line_search_fn=None,
    )

    def closure():
        optimizer.zero_grad()
        penalty = sum(p.pow(2).sum() for p in model.parameters())
        loss = problem.data_loss(model) + 0.5 * WD * penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return flat_weights(model)


def test_full_batch_olbfgs_reaches_the_torch_lbfgs_optimum(problem):
    reference = torch_lbfgs_solution(problem)
    model = problem.model()
    optimizer = OLBFGS(model.parameters(), lr=1.0, memory=10, weight_decay=WD)
    closure = problem.gradient_closure(model, optimizer)

    def run(steps: int) -> torch.Tensor:
        for _ in range(steps):
            closure()
            optimizer.step(closure)
        return flat_weights(model)

    early = run(5)
    relative = (run(45) - reference).norm() / reference.norm()
    assert relative < 1e-8, relative
    assert (early - reference).norm() / reference.norm() > 1e-8  # negative control
    assert optimizer.step_statistics()["pairs_stored"] == 10


def test_full_batch_lbfgs_reaches_the_torch_lbfgs_optimum_with_its_line_search(problem):
    reference = torch_lbfgs_solution(problem)
    model = problem.model()
    optimizer = LBFGS(model.parameters(), memory=10, weight_decay=WD)
    closure = lambda: problem.data_loss(model)  # noqa: E731 (the loss with its graph)
    relative, step_sizes = [], []
    for _ in range(40):
        optimizer.step(closure)
        relative.append(float((flat_weights(model) - reference).norm() / reference.norm()))
        step_sizes.append(optimizer.step_statistics()["step_size"])
    assert relative[-1] < 1e-8, relative[-1]
    assert relative[4] > 1e-8  # negative control: five steps are not enough
    assert optimizer.step_statistics()["pairs_stored"] == 10
    assert any(0 < size < 1 for size in step_sizes[:10])  # the line search shortened a step


def test_the_pair_ring_keeps_the_newest_pairs_in_order_and_skips_take_no_slot():
    """Pairs stored one by one through the skip rule: the ring holds the newest ``memory``
    of the accepted ones, oldest first, exactly as a list that drops the oldest."""
    weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = OLBFGS([weight], memory=3)
    memory = optimizer._memory(FlatParameters(optimizer.param_groups))
    generator = torch.Generator().manual_seed(0)
    kept = []
    for i in range(8):
        s = torch.randn(4, generator=generator, dtype=torch.float64)
        y = -s if i in (2, 5) else s * torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 and 5: skipped
        optimizer._store_pair(memory, s, y)
        if i not in (2, 5):
            kept = [*kept, (s, y)][-3:]
    s, y = optimizer.curvature_pairs()
    torch.testing.assert_close(s, torch.stack([p[0] for p in kept]), rtol=0, atol=0)
    torch.testing.assert_close(y, torch.stack([p[1] for p in kept]), rtol=0, atol=0)
    assert optimizer.step_statistics(["pairs_skipped"])["pairs_skipped"] == 2
    gradient = torch.randn(4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        optimizer._direction(gradient, memory),
        two_loop_recursion(gradient, s, y),
        rtol=1e-14,
        atol=0,
    )


def saddle_step(damping: float) -> dict[str, float]:
    """One oLBFGS step on ``1/2 (w1^2 - w2^2)`` from a point where the step has negative curvature."""
    weight = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    optimizer = OLBFGS([weight], lr=0.1, damping=damping)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (weight[0] ** 2 - weight[1] ** 2)
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    return optimizer.step_statistics()


def test_pairs_with_non_positive_curvature_are_skipped():
    skipped = saddle_step(damping=0.0)
    assert skipped["pairs_stored"] == 0 and skipped["pairs_skipped"] == 1
    assert skipped["curvature"] == pytest.approx(-1.0)  # s^T y / s^T s along w2
    stored = saddle_step(damping=2.0)  # y + 2 s: curvature -1 + 2 > 0
    assert stored["pairs_stored"] == 1 and stored["pairs_skipped"] == 0


def quadratic(curvatures: list[float]) -> tuple[nn.Parameter, callable]:
    h = torch.tensor(curvatures, dtype=torch.float64)
    weight = nn.Parameter(torch.ones(len(curvatures), dtype=torch.float64))
    return weight, lambda: 0.5 * (h * weight * weight).sum()


def test_sqn_pairs_are_hessian_products_at_averaged_iterates():
    curvatures = [1.0, 3.0, 10.0]
    weight, loss = quadratic(curvatures)
    optimizer = SQN([weight], lr=0.05, update_every=3, memory=4)
    iterates = []
    for step in range(9):
        weight.grad = torch.autograd.grad(loss(), weight)[0]
        assert optimizer.hessian_due == (step in (5, 8))
        optimizer.step(hessian_closure=loss if optimizer.hessian_due else None)
        iterates.append(weight.detach().clone())
    averages = [torch.stack(iterates[i : i + 3]).mean(0) for i in (0, 3, 6)]
    s, y = optimizer.curvature_pairs()
    expected_s = torch.stack([averages[1] - averages[0], averages[2] - averages[1]])
    torch.testing.assert_close(s, expected_s)
    torch.testing.assert_close(y, expected_s * torch.tensor(curvatures))
    assert optimizer.step_statistics()["hessian_vector_products"] == 1


def test_sqn_with_exact_pairs_beats_gradient_descent_on_an_ill_conditioned_quadratic():
    curvatures = list(np.geomspace(1e-3, 1.0, 10))
    weight, loss = quadratic(curvatures)
    optimizer = SQN([weight], lr=1.0, update_every=1, memory=10)
    for _ in range(60):
        weight.grad = torch.autograd.grad(loss(), weight)[0]
        optimizer.step(hessian_closure=loss if optimizer.hessian_due else None)
    descent, descent_loss = quadratic(curvatures)  # negative control: GD at lr = 1/L
    gd = torch.optim.SGD([descent], lr=1.0)
    for _ in range(60):
        descent.grad = torch.autograd.grad(descent_loss(), descent)[0]
        gd.step()
    assert float(loss().detach()) < 1e-13 < 1e-3 < float(descent_loss().detach())


def test_sqn_state_dict_round_trip_continues_identically():
    def run(optimizer, weight, loss, steps):
        for _ in range(steps):
            weight.grad = torch.autograd.grad(loss(), weight)[0]
            optimizer.step(hessian_closure=loss if optimizer.hessian_due else None)

    weight, loss = quadratic([1.0, 4.0])
    uninterrupted = SQN([weight], lr=0.1, update_every=2)
    run(uninterrupted, weight, loss, 12)

    first_weight, first_loss = quadratic([1.0, 4.0])
    first = SQN([first_weight], lr=0.1, update_every=2)
    run(first, first_weight, first_loss, 7)
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(first.state_dict()), buffer)
    buffer.seek(0)
    resumed_weight, resumed_loss = quadratic([1.0, 4.0])
    with torch.no_grad():
        resumed_weight.copy_(first_weight)
    resumed = SQN([resumed_weight], lr=0.1, update_every=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    run(resumed, resumed_weight, resumed_loss, 5)
    torch.testing.assert_close(resumed_weight, weight, rtol=0, atol=0)


def test_sqn_refuses_a_missing_hessian_closure_when_a_pair_is_due():
    weight, loss = quadratic([1.0, 2.0])
    optimizer = SQN([weight], lr=0.1, update_every=1)
    weight.grad = torch.ones(2, dtype=torch.float64)
    optimizer.step()  # the first window only sets the averaged iterate
    assert optimizer.hessian_due
    with pytest.raises(ValueError, match="Invalid hessian_closure: None"):
        optimizer.step()


def test_sqn_calls_a_torch_style_closure_first_and_returns_its_loss():
    """torch's convention: ``step(closure)`` recomputes the gradient, steps on it, returns the loss."""
    weight, loss = quadratic([1.0, 2.0])
    optimizer = SQN([weight], lr=0.1, update_every=5)

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    start = weight.detach().clone()
    returned = optimizer.step(closure)
    assert torch.equal(returned, 0.5 * (torch.tensor([1.0, 2.0]) * start * start).sum())
    torch.testing.assert_close(weight.detach(), start - 0.1 * torch.tensor([1.0, 2.0]) * start)


@pytest.mark.parametrize("cls", [OLBFGS, SQN])
@pytest.mark.parametrize(
    ("option", "value"),
    [("lr", -0.5), ("memory", 0), ("memory", -3), ("damping", -1.0), ("curvature_eps", -1e-9)],
)
def test_bad_hyperparameters_raise_naming_the_value(cls, option, value):
    with pytest.raises(ValueError, match=f"{value}"):
        cls(nn.Linear(2, 1).parameters(), **{option: value})


def test_sqn_update_every_must_be_positive_and_shared():
    with pytest.raises(ValueError, match="Invalid update_every value: 0"):
        SQN(nn.Linear(2, 1).parameters(), update_every=0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match="Invalid update_every value: 5"):
        SQN(
            [
                {"params": model[0].parameters()},
                {"params": model[1].parameters(), "update_every": 5},
            ]
        )


def test_olbfgs_trains_a_small_network_with_unused_parameters_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = OLBFGS([*model.parameters(), unused], lr=0.5, weight_decay=1e-3)
    x = torch.randn(64, 3, dtype=torch.float64)
    y = x[:, :1].sin()

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(30):
        closure()
        optimizer.step(closure)
    assert float(closure().detach()) < 0.1 * first
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64)) and unused.grad is None
