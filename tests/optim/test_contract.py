"""The contract every registered optimizer keeps, built through ``create_optimizer``.

For each spec of ``list_optimizers()`` (wrappers included, with their default base), so
that a new optimizer gets every check by registering: the loss decreases on a small
problem; ``state_dict`` save, load and continue equals an uninterrupted run; a deep copy
or a pickled copy continues exactly as the original; torch learning-rate schedulers
drive it (``LambdaLR``, and ``OneCycleLR``/``CyclicLR``/``StepLR`` changing the learning
rate and the momentum or first beta); ``step(closure)`` returns the closure's loss;
parameters without a gradient are left alone, and one that gets its first gradient late
steps exactly as a fresh optimizer would on it; a sparse gradient is either supported
(the step equals the dense one) or rejected with a message before anything changes;
parameters on the ``meta`` device step; ``maximize=True`` on ``f`` equals minimizing
``-f`` wherever the optimizer accepts it (and is otherwise rejected by name); a
negative learning rate raises ``ValueError`` naming the value. Steps follow each
optimizer's :class:`~largebatch.optim.StepProtocol` (gradient first, closure on the
same or a fresh mini-batch), as the training loop does.

The decentralized optimizers (``is_decentralized``) need at least two processes to
step; ``tests/optim/decentralized/`` checks them in four.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from state_compare import assert_same
from torch import nn

from largebatch.optim import create_optimizer, list_optimizers, step_protocol_of
from largebatch.optim.registry import is_decentralized

SPECS = [spec for spec in list_optimizers() if not is_decentralized(spec.name)]
BATCHES = 8
# oLBFGS couples all parameters and reads its curvature test on the host: its contract
# (a declared capability, or a clear error) comes with the classical methods' loop integration
CLASSICAL_PHASE_B = pytest.mark.xfail(strict=True, reason="olbfgs: classical phase B")


def specs(*, known_failures: dict | None = None) -> list:
    """Every registered spec as a test parameter, expected failures marked ``xfail(strict=True)``."""
    failures = dict(known_failures or {})
    return [pytest.param(spec, id=spec.name, marks=failures.get(spec.name, ())) for spec in SPECS]


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


def make_batches(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCHES, 32, 3, generator=generator, dtype=torch.float64)
    targets = torch.stack([x[:, :2].sin() + 0.5 * x[:, 2:] for x in inputs])
    return [(x.to(device), y.to(device)) for x, y in zip(inputs, targets)]


Batch = tuple[torch.Tensor, torch.Tensor]


class Driver:
    """Steps an optimizer as its protocol asks, cycling through fixed mini-batches.

    Args:
        model: the module trained (its ``forward`` maps a batch's inputs to outputs).
        optimizer: the optimizer under test.
        sign: the loss is ``sign * mse``; ``-1`` trains on ``-f``.
        loss: replaces the MSE of ``model`` (``batch -> loss``).
        device: where the batches live (``"meta"`` for meta parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sign: float = 1.0,
        loss: Callable[[Batch], torch.Tensor] | None = None,
        device: str = "cpu",
    ) -> None:
        self.model, self.optimizer, self.sign = model, optimizer, sign
        self.loss = loss or (lambda batch: F.mse_loss(self.model(batch[0]), batch[1]))
        self.batches = make_batches(device)
        self.position = 0
        self.closure_losses: list[torch.Tensor] = []
        self.sparse: Sequence[torch.Tensor] = ()
        """Parameters whose gradients are made sparse after every backward pass."""

    def _next_batch(self) -> Batch:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def _loss(self, batch: Batch) -> torch.Tensor:
        loss = self.sign * self.loss(batch)
        loss.backward()
        for param in self.sparse:
            param.grad = param.grad.to_sparse()
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


# --- copies, late parameters, sparse gradients, meta tensors, maximize, schedulers ---------


COPIERS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("spec", specs())
def test_copy_continues_exactly_as_the_original(spec, copier):
    """The model and optimizer copied together after 3 steps: 3 more steps of each agree bitwise."""
    model = make_model()
    original = Driver(model, create_optimizer(spec.name, model))
    for _ in range(3):
        original.step()
    model_copy, optimizer_copy = COPIERS[copier]((model, original.optimizer))
    copied = Driver(model_copy, optimizer_copy)
    copied.position = original.position
    for _ in range(3):
        original.step()
        copied.step()
    assert torch.equal(flat(model_copy), flat(model))
    assert not torch.equal(flat(model), flat(make_model()))


def _two_matrices() -> tuple[nn.Parameter, nn.Parameter]:
    generator = torch.Generator().manual_seed(2)
    return tuple(
        nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64)) for _ in range(2)
    )


def _matrix_loss(weight: torch.Tensor) -> Callable[[Batch], torch.Tensor]:
    return lambda batch: F.mse_loss(torch.tanh(batch[0] @ weight), batch[1])


@pytest.mark.parametrize("spec", specs(known_failures={"olbfgs": CLASSICAL_PHASE_B}))
def test_late_parameter_steps_like_a_fresh_optimizer(spec):
    """``b`` has no gradient for 5 steps (only ``a`` is trained), then joins (only ``b``).

    Its 4 steps equal those of a fresh optimizer built on ``b`` alone: its state (step
    counts, bias corrections) starts when it joins, as torch's Adam keeps it.
    """
    a, b = _two_matrices()
    fresh_b = nn.Parameter(b.detach().clone())
    optimizer = create_optimizer(spec.name, [a, b])
    early = Driver(None, optimizer, loss=_matrix_loss(a))
    for _ in range(5):
        early.step()
    assert b.grad is None and torch.equal(b, fresh_b)

    late = Driver(None, optimizer, loss=_matrix_loss(b))
    fresh = Driver(None, create_optimizer(spec.name, [fresh_b]), loss=_matrix_loss(fresh_b))
    late.position = fresh.position = early.position
    for _ in range(4):
        late.step()
        fresh.step()
    assert not torch.equal(b, a)
    torch.testing.assert_close(b.detach(), fresh_b.detach(), rtol=1e-12, atol=0)


TORCH_ADAMW_SPARSE = pytest.mark.xfail(
    strict=True,
    reason="torch.optim.AdamW rejects a sparse gradient only when it reaches its group, "
    "after stepping the groups before it",
)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("spec", specs(known_failures={"adamw": TORCH_ADAMW_SPARSE}))
def test_sparse_gradient_is_supported_or_rejected_before_anything_changes(spec):
    """After 2 dense steps, a sparse gradient on the last group's last parameter.

    Either the optimizer rejects it (a ``RuntimeError`` saying "sparse") leaving the
    parameters and every piece of state (step counts included) as they were, or it
    supports it and steps exactly as with the same gradient dense.
    """
    model = make_model()
    optimizer = create_optimizer(spec.name, model)
    driver = Driver(model, optimizer)
    dense_model = make_model()
    dense = Driver(dense_model, create_optimizer(spec.name, dense_model))
    for _ in range(2):
        driver.step()
        dense.step()
    last = optimizer.param_groups[-1]["params"][-1]
    assert any(last is p for p in model.net.parameters())
    state_before = copy.deepcopy(optimizer.state_dict())
    params_before = flat(model)
    driver.sparse = [last]
    try:
        driver.step()
    except RuntimeError as error:
        assert "sparse" in str(error)
        assert torch.equal(flat(model), params_before)
        assert_same(optimizer.state_dict(), state_before)
        return
    dense.step()
    torch.testing.assert_close(flat(model), flat(dense_model), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", specs(known_failures={"olbfgs": CLASSICAL_PHASE_B}))
def test_meta_parameters_step(spec):
    """A model on the ``meta`` device: steps run and state keeps the parameters' shapes there."""
    model = make_model().to("meta")
    optimizer = create_optimizer(spec.name, model)
    driver = Driver(model, optimizer, device="meta")
    for _ in range(2):
        driver.step()
    for param in model.parameters():
        assert param.is_meta
    # a parameter's state tensors of its own shape (moments, buffers) live with it
    tensors = [
        value
        for optimizer_ in (optimizer, getattr(optimizer, "base_optimizer", None))
        if optimizer_ is not None
        for param, state in optimizer_.state.items()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape
    ]
    assert tensors and all(t.is_meta for t in tensors)


@pytest.mark.parametrize("spec", specs())
def test_maximize_equals_minimizing_the_negated_loss(spec):
    """``maximize=True`` on ``f`` and the default on ``-f`` step alike; without it ``f`` differs.

    An optimizer that does not accept ``maximize`` must reject it by name.
    """
    model = make_model()
    try:
        optimizer = create_optimizer(spec.name, model, maximize=True)
    except TypeError as error:
        assert "maximize" in str(error)
        return
    maximizing = Driver(model, optimizer)
    negated_model, plain_model = make_model(), make_model()
    negated = Driver(negated_model, create_optimizer(spec.name, negated_model), sign=-1.0)
    plain = Driver(plain_model, create_optimizer(spec.name, plain_model))
    for _ in range(5):
        maximizing.step()
        negated.step()
        plain.step()
    torch.testing.assert_close(flat(model), flat(negated_model), rtol=1e-12, atol=0)
    assert full_loss(model) > full_loss(plain_model)


def _first_moment(group: dict) -> float | None:
    """The value cycling schedulers write: ``momentum``, or ``betas[0]``."""
    if "momentum" in group:
        return group["momentum"]
    return group["betas"][0] if "betas" in group else None


SCHEDULERS = {
    "OneCycleLR": lambda optimizer, lrs, cycle: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lrs, total_steps=8, cycle_momentum=cycle
    ),
    "CyclicLR": lambda optimizer, lrs, cycle: torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=[lr / 10 for lr in lrs], max_lr=lrs, step_size_up=2, cycle_momentum=cycle
    ),
    "StepLR": lambda optimizer, lrs, cycle: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=2, gamma=0.5
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("spec", specs())
def test_schedulers_change_lr_and_momentum(spec, scheduler):
    """Each step uses what the scheduler set: the groups' values follow it, parameters stay finite.

    Cycling schedulers also cycle ``momentum`` or ``betas[0]`` where the optimizer has one.
    """
    model = make_model()
    optimizer = create_optimizer(spec.name, model)
    lrs = [group["lr"] for group in optimizer.param_groups]
    cycle = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    schedule = SCHEDULERS[scheduler](optimizer, lrs, cycle)
    driver = Driver(model, optimizer)
    seen_lrs, seen_moments = set(), set()
    for _ in range(6):
        assert [group["lr"] for group in optimizer.param_groups] == schedule.get_last_lr()
        seen_lrs.add(optimizer.param_groups[0]["lr"])
        seen_moments.add(_first_moment(optimizer.param_groups[0]))
        driver.step()
        schedule.step()
    assert len(seen_lrs) >= 3
    if cycle and scheduler != "StepLR":
        assert len(seen_moments) >= 3
    assert all(math.isfinite(value) for value in flat(model).tolist())
    assert not torch.equal(flat(model), flat(make_model()))
