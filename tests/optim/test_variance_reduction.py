"""SVRG and SAGA: linear convergence on logistic regression, their invariants, their state.

* On L2-regularised logistic regression both reach 1e-8 suboptimality at a
  linear rate (log-gap linear in the epoch) where plain SG with the same step
  stalls at its noise floor (negative control).
* SVRG's Johnson-Zhang rate (T-9, option b) holds on a finite-sum least squares.
* SVRG refuses a step before its first snapshot; ``snapshot_point="average"``
  snapshots the mean of the inner iterates; both update paths agree; the state
  round-trips.
* SAGA's direction is unbiased for any table (its average over the examples is
  the full gradient), the table mean stays the mean of the table, a repeated
  index keeps its last gradient; bad input raises ``ValueError``.
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

from largebatch.diagnostics.per_example import per_example_gradients
from largebatch.optim.saga import SAGA
from largebatch.optim.svrg import SVRG

BATCH = 10
LR = 2.0  # about 1/L for tf-idf rows of unit norm: per-example curvature <= 1/2 (||x||^2 + 1)


@pytest.fixture(scope="module")
def problem() -> LogReg:
    return LogReg(num_train=200, num_features=20, weight_decay=1e-2)


def step_batch(problem: LogReg, model: nn.Module, optimizer, batch: torch.Tensor) -> None:
    """One step on ``batch`` as the optimizer's protocol asks."""
    if isinstance(optimizer, SAGA):
        grads = per_example_gradients(model, F.cross_entropy, problem.X[batch], problem.y[batch])
        optimizer.step(indices=batch, per_example_grads=grads)
        return
    if isinstance(optimizer, SVRG) and optimizer.snapshot_due:
        optimizer.snapshot(problem.gradient_closure(model, optimizer))
    closure = problem.gradient_closure(model, optimizer, batch)
    closure()
    optimizer.step(closure) if isinstance(optimizer, SVRG) else optimizer.step()


def run_epochs(problem: LogReg, make_optimizer, epochs: int, seed: int = 0) -> list[float]:
    """Suboptimality after each epoch of shuffled batches (without replacement, as the loop)."""
    model = problem.model()
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    gaps = [problem.suboptimality(model)]
    for _ in range(epochs):
        for batch in torch.randperm(problem.n, generator=generator).split(BATCH):
            step_batch(problem, model, optimizer, batch)
        gaps.append(problem.suboptimality(model))
    return gaps


def make_svrg(problem: LogReg):
    return lambda model: SVRG(
        model.parameters(), lr=LR, inner_steps=problem.n // BATCH, weight_decay=1e-2
    )


def make_saga(problem: LogReg):
    return lambda model: SAGA(model.parameters(), num_examples=problem.n, lr=LR, weight_decay=1e-2)


@pytest.mark.parametrize("make", [make_svrg, make_saga], ids=["svrg", "saga"])
def test_reaches_1e_8_at_a_linear_rate_where_sg_stalls(problem, make):
    gaps = run_epochs(problem, make(problem), 18)
    assert gaps[-1] < 1e-8, gaps
    epochs = np.arange(1, len(gaps))
    slope, intercept = np.polyfit(epochs, np.log(gaps[1:]), 1)
    assert slope < np.log(0.4)  # at least a 0.4 contraction per epoch ...
    residuals = np.log(gaps[1:]) - (slope * epochs + intercept)
    assert np.abs(residuals).max() < np.log(10)  # ... and steadily so: a straight line in log scale

    sg = run_epochs(  # negative control: the same step without variance reduction
        problem,
        lambda model: torch.optim.SGD(model.parameters(), lr=LR, weight_decay=1e-2),
        18,
    )
    assert min(sg[-8:]) > 1e-5, sg


def johnson_zhang_ratios(lr: float, seeds: int, outer: int) -> tuple[np.ndarray, float]:
    """Per-snapshot ratios of the mean gap of option-(b) SVRG on least squares, and ``rho``.

    ``1/2 (x_i^T w - y_i)^2`` with unit-norm ``x_i`` (each ``f_i`` is 1-smooth),
    ``c`` the smallest eigenvalue of the mean of ``x_i x_i^T``, single-example
    steps and ``m = 50 L / c`` inner steps.
    """
    generator = torch.Generator().manual_seed(0)
    n, d = 20, 3
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    X /= X.norm(dim=1, keepdim=True)
    noise = 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    y = X @ torch.randn(d, generator=generator, dtype=torch.float64) + noise
    c = float(torch.linalg.eigvalsh(X.T @ X / n).min())
    inner = int(np.ceil(50 / c))
    solution = torch.linalg.lstsq(X, y).solution
    optimum = float(0.5 * (X @ solution - y).pow(2).mean())

    gaps = np.zeros((seeds, outer + 1))
    for seed in range(seeds):
        weight = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        optimizer = SVRG([weight], lr=lr, inner_steps=inner, snapshot_point="average")
        sampler = torch.Generator().manual_seed(100 + seed)

        def closure(index=slice(None), weight=weight, optimizer=optimizer):
            optimizer.zero_grad()
            value = 0.5 * (X[index] @ weight - y[index]).pow(2).mean()
            value.backward()
            return value

        for k in range(outer + 1):
            optimizer.snapshot(closure)  # at the mean of the inner iterates (option b)
            gaps[seed, k] = optimizer.step_statistics()["snapshot_loss"] - optimum
            if k == outer:
                break
            for _ in range(inner):
                index = torch.randint(n, (1,), generator=sampler)
                closure(index)
                optimizer.step(lambda index=index: closure(index))
    mean = gaps.mean(axis=0)
    return mean[1:] / mean[:-1], (1 / (inner * c * lr) + 2 * lr) / (1 - 2 * lr)


def test_svrg_option_b_meets_the_johnson_zhang_rate():
    """T-9: ``E[R(w_{k+1}) - R*] <= rho E[R(w_k) - R*]``, ``rho = (1/(mca) + 2La)/(1 - 2La)``.

    With ``a = 0.1/L``, ``m = 50 L / c``: ``rho = 0.5``. Negative control: a step
    beyond ``2/L`` diverges, and the same comparison fails.
    """
    ratios, rho = johnson_zhang_ratios(lr=0.1, seeds=4, outer=3)
    assert rho <= 0.5
    assert (ratios <= rho).all(), ratios
    diverging, _ = johnson_zhang_ratios(lr=2.5, seeds=1, outer=1)
    assert (diverging > 1).all(), diverging


def test_svrg_needs_a_snapshot_before_stepping(problem):
    model = problem.model()
    optimizer = SVRG(model.parameters(), lr=0.1)
    closure = problem.gradient_closure(model, optimizer, torch.arange(10))
    closure()
    assert optimizer.snapshot_due
    with pytest.raises(ValueError, match="snapshots=0"):
        optimizer.step(closure)
    optimizer.snapshot(problem.gradient_closure(model, optimizer))
    closure()
    optimizer.step(closure)  # control: with a snapshot it steps
    assert not optimizer.snapshot_due


def test_svrg_average_snapshot_point_is_the_mean_of_the_inner_iterates(problem):
    model = problem.model()
    optimizer = SVRG(model.parameters(), lr=0.5, inner_steps=3, snapshot_point="average")
    optimizer.snapshot(problem.gradient_closure(model, optimizer))
    iterates = []
    for batch in torch.arange(30).split(BATCH):
        closure = problem.gradient_closure(model, optimizer, batch)
        closure()
        optimizer.step(closure)
        iterates.append(flat_weights(model))
    assert optimizer.snapshot_due
    optimizer.snapshot(problem.gradient_closure(model, optimizer))
    torch.testing.assert_close(flat_weights(model), torch.stack(iterates).mean(0))


def trajectory(problem: LogReg, foreach: bool, steps: int = 25) -> torch.Tensor:
    model = nn.Sequential(nn.Linear(problem.d, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    optimizer = SVRG(model.parameters(), lr=0.3, inner_steps=7, weight_decay=1e-3, foreach=foreach)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if optimizer.snapshot_due:
            optimizer.snapshot(problem.gradient_closure(model, optimizer))
        batch = torch.randint(problem.n, (BATCH,), generator=generator)
        closure = problem.gradient_closure(model, optimizer, batch)
        closure()
        optimizer.step(closure)
    return flat_weights(model)


def test_svrg_single_and_multi_tensor_paths_agree(problem):
    torch.testing.assert_close(
        trajectory(problem, foreach=True), trajectory(problem, foreach=False), rtol=0, atol=1e-14
    )


def test_svrg_state_dict_round_trip_continues_identically(problem):
    generator_seed = 3

    def drive(model, optimizer, generator, steps):
        for _ in range(steps):
            batch = torch.randint(problem.n, (BATCH,), generator=generator)
            step_batch(problem, model, optimizer, batch)

    model = problem.model()
    optimizer = SVRG(model.parameters(), lr=LR, inner_steps=4, snapshot_point="average")
    generator = torch.Generator().manual_seed(generator_seed)
    drive(model, optimizer, generator, 10)

    first = problem.model()
    first_optimizer = SVRG(first.parameters(), lr=LR, inner_steps=4, snapshot_point="average")
    first_generator = torch.Generator().manual_seed(generator_seed)
    drive(first, first_optimizer, first_generator, 6)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = problem.model()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = SVRG(resumed.parameters(), lr=LR, inner_steps=4, snapshot_point="average")
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_generator = torch.Generator().manual_seed(generator_seed)
    torch.randint(problem.n, (6, BATCH), generator=resumed_generator)  # the draws already made
    drive(resumed, resumed_optimizer, resumed_generator, 4)
    torch.testing.assert_close(flat_weights(resumed), flat_weights(model), rtol=0, atol=0)


def saga_direction(problem, model, optimizer, index: int) -> torch.Tensor:
    """The direction SAGA would take on the single example ``index`` (without stepping)."""
    model, optimizer = copy.deepcopy((model, optimizer))
    before = flat_weights(model)
    step_batch(problem, model, optimizer, torch.tensor([index]))
    return (before - flat_weights(model)) / optimizer.param_groups[0]["lr"]


def test_saga_direction_is_unbiased_for_any_table(problem):
    model = problem.model()
    optimizer = SAGA(model.parameters(), num_examples=problem.n, lr=0.5, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    for checkpoint in (0, 5):  # an empty table, then one a quarter filled at older iterates
        for _ in range(checkpoint):
            step_batch(
                problem, model, optimizer, torch.randint(problem.n, (BATCH,), generator=generator)
            )
        directions = torch.stack(
            [saga_direction(problem, model, optimizer, i) for i in range(problem.n)]
        )
        model.zero_grad()
        loss = problem.data_loss(model)
        loss.backward()
        full = torch.cat([(p.grad + 1e-2 * p).detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(directions.mean(0), full, rtol=1e-10, atol=1e-12)
        assert (directions - full).norm(dim=1).max() > 1e-3  # each single one is noisy


def test_saga_table_mean_and_repeated_indices(problem):
    model = problem.model()
    optimizer = SAGA(model.parameters(), num_examples=problem.n, lr=0.5)
    batch = torch.tensor([3, 7, 3, 11])  # example 3 twice
    x, y = problem.X[batch], problem.y[batch]
    grads = per_example_gradients(model, F.cross_entropy, x, y)
    grads[0][2] += 1.0  # make the two copies of example 3 differ: the last one is stored
    optimizer.step(indices=batch, per_example_grads=grads)
    for p, g in zip(model.parameters(), grads):
        state = optimizer.state[p]
        torch.testing.assert_close(state["table"][3], g[2])
        torch.testing.assert_close(state["table"][7], g[1])
        torch.testing.assert_close(state["table_mean"], state["table"].mean(0))
    assert optimizer.step_statistics()["examples_seen"] == 3


def test_saga_state_dict_round_trip(problem):
    model = problem.model()
    optimizer = SAGA(model.parameters(), num_examples=problem.n, lr=0.5)
    step_batch(problem, model, optimizer, torch.arange(10))
    clone_model = problem.model()
    clone_model.load_state_dict(model.state_dict())
    clone = SAGA(clone_model.parameters(), num_examples=problem.n, lr=0.5)
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, o in ((model, optimizer), (clone_model, clone)):
        step_batch(problem, m, o, torch.arange(5, 15))
    torch.testing.assert_close(flat_weights(clone_model), flat_weights(model), rtol=0, atol=0)


def test_saga_bad_input_raises_naming_it(problem):
    model = problem.model()
    optimizer = SAGA(model.parameters(), num_examples=problem.n)
    grads = per_example_gradients(model, F.cross_entropy, problem.X[:2], problem.y[:2])
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        optimizer.step(indices=torch.tensor([0, 200]), per_example_grads=grads)
    with pytest.raises(ValueError, match="1-D integer"):
        optimizer.step(indices=torch.tensor([0.0, 1.0]), per_example_grads=grads)
    with pytest.raises(ValueError, match=r"per_example_grads\[0\]: shape \(2, 2, 20\)"):
        optimizer.step(indices=torch.tensor([0, 1, 2]), per_example_grads=grads)
    with pytest.raises(ValueError, match="1 tensors for 2 parameters"):
        optimizer.step(indices=torch.tensor([0, 1]), per_example_grads=grads[:1])
    with pytest.raises(ValueError, match="Invalid closure"):
        optimizer.step(lambda: None, indices=torch.tensor([0, 1]), per_example_grads=grads)
    optimizer.step(indices=torch.tensor([0, 1]), per_example_grads=grads)  # control


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (SVRG, {"lr": -0.5}, "-0.5"),
        (SVRG, {"inner_steps": 0}, "inner_steps value: 0"),
        (SVRG, {"snapshot_point": "random"}, "snapshot_point value: 'random'"),
        (SVRG, {"weight_decay": -1.0}, "weight_decay value: -1.0"),
        (SAGA, {"num_examples": 0}, "num_examples value: 0"),
        (SAGA, {"num_examples": 10, "lr": -0.5}, "-0.5"),
        (SAGA, {"num_examples": 10, "table_dtype": torch.int32}, "table_dtype value: torch.int32"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(nn.Linear(2, 1).parameters(), **options)
