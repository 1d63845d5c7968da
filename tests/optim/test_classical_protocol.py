"""Every classical optimizer driven only through its declared ClassicalStepProtocol.

The driver is the training loop's own (:class:`~largebatch.train.step.StepDriver`): it
reads nothing but the protocol's fields and the optimizer's ``snapshot_due`` /
``hessian_due``. Each optimizer trains a small logistic regression through it, reports
every statistic it declares, and the driver counts each step's cost in example
gradients as docs/classical.md says (checked against the optimizer's own counts of
Hessian-vector products and line-search trials).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from classical_problems import LogReg
from torch.utils.data import DistributedSampler, TensorDataset

from largebatch.optim.classical_protocol import ReportsStepStatistics
from largebatch.optim.newton_cg import NewtonCG
from largebatch.optim.quasi_newton import LBFGS, OLBFGS, SQN
from largebatch.optim.saga import SAGA
from largebatch.optim.svrg import SVRG
from largebatch.train.data import BatchStream
from largebatch.train.step import FORWARD_COST, HVP_COST, StepDriver

BATCH, HESSIAN = 20, 10


def build(name: str, model, problem: LogReg):
    params, wd = model.parameters(), problem.weight_decay
    return {
        "svrg": lambda: SVRG(params, lr=1.0, inner_steps=10, weight_decay=wd),
        "saga": lambda: SAGA(params, num_examples=problem.n, lr=1.0, weight_decay=wd),
        "newton-cg": lambda: NewtonCG(params, max_cg=5, weight_decay=wd),
        "olbfgs": lambda: OLBFGS(params, lr=0.5, weight_decay=wd),
        "sqn": lambda: SQN(params, lr=0.5, update_every=3, weight_decay=wd),
        "lbfgs": lambda: LBFGS(params, weight_decay=wd),
    }[name]()


NAMES = ["svrg", "saga", "newton-cg", "olbfgs", "sqn", "lbfgs"]


@pytest.fixture(scope="module")
def problem() -> LogReg:
    return LogReg(num_train=100, num_features=10, weight_decay=1e-2)


def driven(problem: LogReg, name: str) -> tuple[torch.nn.Module, object, StepDriver, BatchStream]:
    model = problem.model()
    optimizer = build(name, model, problem)
    dataset = TensorDataset(problem.X, problem.y)
    sampler = DistributedSampler(dataset, 1, 0, shuffle=True, seed=0, drop_last=True)
    stream = BatchStream(dataset, sampler, BATCH, 1, torch.device("cpu"))
    driver = StepDriver(model, optimizer, F.cross_entropy, hessian_batch_size=HESSIAN)
    return model, optimizer, driver, stream


@pytest.mark.parametrize("name", NAMES)
def test_driven_through_the_protocol_it_trains_and_reports_its_statistics(problem, name):
    model, optimizer, driver, stream = driven(problem, name)
    assert isinstance(optimizer, ReportsStepStatistics)
    assert all(math.isnan(v) for v in optimizer.step_statistics().values())
    before = problem.objective(model)
    for _ in range(12):
        driver.step(stream)
    assert problem.objective(model) < before
    statistics = optimizer.step_statistics()
    assert set(statistics) == set(optimizer.STATISTICS)
    assert all(isinstance(v, float) for v in statistics.values())


def expected_cost(name: str, step: int, statistics: dict[str, float], n: int) -> float:
    """A step's cost in example gradients, from docs/classical.md's accounting."""
    b, h = BATCH, HESSIAN
    if name == "svrg":  # the driver's gradient and the closure at the snapshot, + n per snapshot
        return 2 * b + (n if step % 10 == 0 else 0)
    if name == "saga":
        return b
    if name == "olbfgs":
        return 2 * b
    if name == "sqn":  # a gradient; on pair steps, the Hessian sample's gradient and one product
        pair = statistics["hessian_vector_products"]
        return b + pair * (h + HVP_COST * h)
    trials = statistics["line_search_trials"]
    if name == "lbfgs":
        return b + FORWARD_COST * b * trials
    # newton-cg: gradient, the Hessian sample's gradient, the products, the trials
    return b + h + HVP_COST * h * statistics["hessian_vector_products"] + FORWARD_COST * b * trials


@pytest.mark.parametrize("name", NAMES)
def test_each_step_counts_its_cost_in_example_gradients(problem, name):
    _, optimizer, driver, stream = driven(problem, name)
    pair_steps = 0
    for step in range(12):
        result = driver.step(stream)
        statistics = optimizer.step_statistics()
        expected = expected_cost(name, step, statistics, problem.n)
        assert result.example_gradients == pytest.approx(expected), step
        pair_steps += statistics.get("hessian_vector_products", 0) > 0
    if name == "sqn":
        assert pair_steps == 3  # steps 6, 9, 12: the accounting was exercised on pair steps


def test_a_hessian_sample_larger_than_the_batch_is_drawn_apart_and_the_same_on_resume(problem):
    """SQN's Hessian sample of 40 > 20 examples: an independent sample per step, the same
    for the same step of a resumed stream (so a resumed run is exact)."""
    _, _, driver, stream = driven(problem, "sqn")
    stream.next()
    first = stream.sample(40)
    stream.next()
    second = stream.sample(40)
    assert len(first[0]) == 40 and not torch.equal(first[1], second[1])
    resumed = driven(problem, "sqn")[3]
    resumed.load_state_dict({**stream.state_dict(), "batches": 1})
    assert torch.equal(resumed.sample(40)[0], first[0])
