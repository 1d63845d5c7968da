"""Every classical optimizer driven only through its declared ClassicalStepProtocol.

:class:`ProtocolDriver` reads nothing but the protocol's fields and the
optimizer's ``snapshot_due``/``hessian_due``: it is the reference for what a
training loop does with these optimizers. Each optimizer trains a small
logistic regression through it and reports every statistic it declares.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from classical_problems import LogReg

from largebatch.diagnostics.per_example import per_example_gradients
from largebatch.optim.classical_protocol import ClassicalStepProtocol, ReportsStepStatistics
from largebatch.optim.newton_cg import NewtonCG
from largebatch.optim.quasi_newton import OLBFGS, SQN
from largebatch.optim.saga import SAGA
from largebatch.optim.svrg import SVRG


class ProtocolDriver:
    """Steps any classical optimizer on ``problem`` as its protocol says."""

    def __init__(self, problem: LogReg, model, optimizer, batch_size: int = 20) -> None:
        self.problem, self.model, self.optimizer = problem, model, optimizer
        self.protocol: ClassicalStepProtocol = optimizer.step_protocol
        self.generator = torch.Generator().manual_seed(0)
        self.batch_size = batch_size
        self.example_gradients = 0  # per-example gradient evaluations, the review's cost unit

    def backward_closure(self, index):
        def closure():
            self.optimizer.zero_grad()
            loss = self.problem.data_loss(self.model, index)
            loss.backward()
            self.example_gradients += len(self.problem.X[index])
            return loss

        return closure

    def loss_closure(self, index):
        return lambda: self.problem.data_loss(self.model, index)

    def step(self) -> None:
        protocol, optimizer = self.protocol, self.optimizer
        index = torch.randperm(self.problem.n, generator=self.generator)[: self.batch_size]
        if protocol.snapshots and optimizer.snapshot_due:
            optimizer.snapshot(self.backward_closure(slice(None)))
        if protocol.per_example:
            x, y = self.problem.X[index], self.problem.y[index]
            grads = per_example_gradients(self.model, F.cross_entropy, x, y)
            self.example_gradients += len(index)
            optimizer.step(indices=index, per_example_grads=grads)
            return
        optimizer.zero_grad()
        if protocol.gradient_before_step:
            self.backward_closure(index)()
        kwargs = {}
        if protocol.hessian_sample and optimizer.hessian_due:
            kwargs["hessian_closure"] = self.loss_closure(index[: self.batch_size // 2])
        if protocol.closure is None:
            optimizer.step(**kwargs)
        elif protocol.closure_backward:
            optimizer.step(self.backward_closure(index), **kwargs)
        else:
            optimizer.step(self.loss_closure(index), **kwargs)


def build(name: str, model, problem: LogReg):
    params, wd = model.parameters(), problem.weight_decay
    return {
        "svrg": lambda: SVRG(params, lr=1.0, inner_steps=10, weight_decay=wd),
        "saga": lambda: SAGA(params, num_examples=problem.n, lr=1.0, weight_decay=wd),
        "newton-cg": lambda: NewtonCG(params, max_cg=5, weight_decay=wd),
        "olbfgs": lambda: OLBFGS(params, lr=0.5, weight_decay=wd),
        "sqn": lambda: SQN(params, lr=0.5, update_every=3, weight_decay=wd),
    }[name]()


NAMES = ["svrg", "saga", "newton-cg", "olbfgs", "sqn"]


@pytest.fixture(scope="module")
def problem() -> LogReg:
    return LogReg(num_train=100, num_features=10, weight_decay=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_driven_through_the_protocol_it_trains_and_reports_its_statistics(problem, name):
    model = problem.model()
    optimizer = build(name, model, problem)
    assert isinstance(optimizer, ReportsStepStatistics)
    assert all(math.isnan(v) for v in optimizer.step_statistics().values())
    driver = ProtocolDriver(problem, model, optimizer)
    before = problem.objective(model)
    for _ in range(12):
        driver.step()
    assert problem.objective(model) < before
    statistics = optimizer.step_statistics()
    assert set(statistics) == set(optimizer.STATISTICS)
    assert all(isinstance(v, float) for v in statistics.values())
