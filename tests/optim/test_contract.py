"""The contract every registered optimizer keeps, built through ``create_optimizer``.

For each spec of ``list_optimizers()`` (wrappers included, with their default base):
the loss decreases on a small problem; ``state_dict`` save, load and continue equals
an uninterrupted run; torch learning-rate schedulers drive it; ``step(closure)``
returns the closure's loss; parameters without a gradient are left alone; a negative
learning rate raises ``ValueError`` naming the value. Steps follow each optimizer's
:class:`~largebatch.optim.StepProtocol` (gradient first, closure on the same or a
fresh mini-batch), as the training loop does.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.optim import create_optimizer, list_optimizers, step_protocol_of

SPECS = list_optimizers()
BATCHES = 8


class Problem(nn.Module):
    """A small regression MLP plus a parameter the loss never touches (it gets no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        self.unused = nn.Parameter(torch.ones(4, 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


def make_model() -> Problem:
    torch.manual_seed(0)
    return Problem().double()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCHES, 32, 3, generator=generator, dtype=torch.float64)
    targets = torch.stack([x[:, :2].sin() + 0.5 * x[:, 2:] for x in inputs])
    return list(zip(inputs, targets))


class Driver:
    """Steps an optimizer as its protocol asks, cycling through fixed mini-batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.batches = make_batches()
        self.position = 0
        self.closure_losses: list[torch.Tensor] = []

    def _next_batch(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def _loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        loss = F.mse_loss(self.model(inputs), targets)
        loss.backward()
        return loss

    def step(self, *, force_closure: bool = False):
        """One update; returns what ``optimizer.step`` returned."""
        protocol = step_protocol_of(self.optimizer)
        batch = self._next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        if protocol.closure is None and not force_closure:
            self._loss(batch)
            return self.optimizer.step()
        if protocol.gradient_before_step and protocol.closure is not None:
            self._loss(batch)

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            fresh = protocol.closure == "fresh"
            loss = self._loss(self._next_batch() if fresh else batch)
            self.closure_losses.append(loss)
            return loss

        return self.optimizer.step(closure)


def full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(model(x), y).item() for x, y in make_batches())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.net.parameters()])


@pytest.fixture(params=SPECS, ids=[spec.name for spec in SPECS])
def spec(request):
    return request.param


def test_loss_decreases(spec):
    model = make_model()
    driver = Driver(model, create_optimizer(spec.name, model))
    before = full_loss(model)
    for _ in range(3 * BATCHES):
        driver.step()
    assert full_loss(model) < before


def test_state_dict_save_load_continue_equals_uninterrupted_run(spec):
    model = make_model()
    uninterrupted = Driver(model, create_optimizer(spec.name, model))
    for _ in range(10):
        uninterrupted.step()

    model = make_model()
    first = Driver(model, create_optimizer(spec.name, model))
    for _ in range(6):
        first.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    optimizer = create_optimizer(spec.name, resumed_model)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    resumed = Driver(resumed_model, optimizer)
    resumed.position = first.position
    for _ in range(4):
        resumed.step()
    torch.testing.assert_close(flat(resumed_model), flat(uninterrupted.model), rtol=0, atol=0)


def test_lr_scheduler_drives_every_group(spec):
    model = make_model()
    optimizer = create_optimizer(spec.name, model)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    factors = [1.0, 0.5, 0.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[min(step, 2)])
    driver = Driver(model, optimizer)
    start = flat(model)
    driver.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.5 * lr for lr in base_lrs]
    driver.step()
    scheduler.step()
    moved = flat(model)
    assert not torch.equal(moved, start)
    driver.step()  # learning rate 0: no change
    torch.testing.assert_close(flat(model), moved, rtol=0, atol=0)


def test_step_with_closure_returns_the_loss(spec):
    model = make_model()
    driver = Driver(model, create_optimizer(spec.name, model))
    returned = driver.step(force_closure=True)
    assert any(returned is loss for loss in driver.closure_losses)


def test_parameters_without_gradient_are_skipped(spec):
    model = make_model()
    driver = Driver(model, create_optimizer(spec.name, model))
    for _ in range(3):
        driver.step()
    assert model.unused.grad is None
    assert torch.equal(model.unused.detach(), torch.ones(4, 2, dtype=torch.float64))


def test_negative_learning_rate_raises_naming_it(spec):
    with pytest.raises(ValueError, match="-0.5"):
        create_optimizer(spec.name, make_model(), lr=-0.5)
