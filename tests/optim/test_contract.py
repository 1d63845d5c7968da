"""The contract every registered optimizer keeps, built through ``create_optimizer``.

For each spec of ``list_optimizers()`` (wrappers included, with their default base), so
that a new optimizer gets every check by registering: the loss decreases on a small
problem; ``state_dict`` save, load and continue equals an uninterrupted run; a deep copy
or a pickled copy continues exactly as the original; torch learning-rate schedulers
drive it (``LambdaLR``, and ``OneCycleLR``/``CyclicLR``/``StepLR`` changing the learning
rate and the momentum or first beta); ``step(closure)`` returns the closure's loss;
parameters without a gradient are left alone, and one that gets its first gradient late
steps exactly as a fresh optimizer would on it (or, for an optimizer declared
``couples_parameters``, steps without disturbing the others and with a state that
round-trips); a sparse gradient is either supported (the step equals the dense one) or
rejected with a message before anything changes; parameters on the ``meta`` device step
(or, for an optimizer declared ``steps_on_meta=False``, are refused when it is built);
``maximize=True`` on ``f`` equals minimizing ``-f`` and ascends a linear loss for every
optimizer whose arguments include it (those of :data:`REJECTS_MAXIMIZE` reject it by
name); a negative learning rate raises ``ValueError`` naming the value. Steps are the
training loop's own
(:class:`~largebatch.train.step.StepDriver`, which follows each optimizer's step
protocol: gradient first, closures on the same or a fresh mini-batch, loss closures,
Hessian samples, per-example gradients, snapshots).

The decentralized optimizers (``is_decentralized``) need at least two processes to
step: ``tests/optim/decentralized/test_contract_decentralized.py`` runs these checks
(:data:`CHECKS`) for them in a gloo group of two.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from state_compare import assert_same
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from largebatch.optim import OptimizerSpec, create_optimizer, list_optimizers
from largebatch.optim.registry import is_decentralized, optimizer_arguments
from largebatch.train.data import BatchStream
from largebatch.train.step import StepDriver, StepResult, classical_protocol

SPECS = [spec for spec in list_optimizers() if not is_decentralized(spec.name)]
BATCHES = 8
BATCH_SIZE = 32


def build(spec: OptimizerSpec, params, **hparams) -> torch.optim.Optimizer:
    """``create_optimizer`` with the spec's defaults and the data arguments a run would fill
    in (SAGA's table size); the defaults are passed, so a spec changed with
    ``dataclasses.replace`` builds with its own."""
    data = {"num_examples": BATCHES * BATCH_SIZE}
    arguments = {key: data[key] for key in spec.data_arguments}
    return create_optimizer(spec.name, params, **{**spec.defaults, **arguments, **hparams})


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
    inputs = torch.randn(BATCHES, BATCH_SIZE, 3, generator=generator, dtype=torch.float64)
    targets = torch.stack([x[:, :2].sin() + 0.5 * x[:, 2:] for x in inputs])
    return [(x.to(device), y.to(device)) for x, y in zip(inputs, targets)]


class MatrixModel(nn.Module):
    """``tanh(x @ weight)`` around a given parameter (the late-parameter test's two halves)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(inputs @ self.weight)


class Driver:
    """Steps an optimizer as the training loop does, through the fixed mini-batches in order.

    Args:
        model: the module trained.
        optimizer: the optimizer under test.
        sign: the loss is ``sign * loss``; ``-1`` trains on ``-f``.
        device: where the batches go (``"meta"`` for meta parameters).
        loss: ``loss(outputs, targets)``, the mean squared error unless given.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sign: float = 1.0,
        device: str = "cpu",
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        inputs, targets = (torch.cat(parts) for parts in zip(*make_batches()))
        dataset = TensorDataset(inputs, targets)
        sampler = DistributedSampler(dataset, 1, 0, shuffle=False, drop_last=True)
        self.stream = BatchStream(dataset, sampler, BATCH_SIZE, 1, torch.device(device))
        self.losses: list[torch.Tensor] = []
        """Every loss the step computed, in order."""

        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            value = sign * loss(outputs, targets)
            self.losses.append(value)
            return value

        self.loss_fn = loss_fn
        self.stepper = StepDriver(model, optimizer, loss_fn, full_pass_batch_size=BATCH_SIZE)

    @property
    def position(self) -> int:
        return self.stream.position

    @position.setter
    def position(self, batches: int) -> None:
        self.stream.position = batches

    def step(self) -> StepResult:
        return self.stepper.step(self.stream)


def full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(model(x), y).item() for x, y in make_batches())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.net.parameters()])


@pytest.fixture(params=SPECS, ids=[spec.name for spec in SPECS])
def spec(request):
    return request.param


def test_the_driver_reads_the_stream_as_the_fixed_batches():
    """The contract's batches are the stream's, in order (so positions mean what they say)."""
    driver = Driver(make_model(), create_optimizer("sgd", make_model()))
    for x, y in make_batches() * 2:
        (inputs, targets), *_ = driver.stream.next()
        assert torch.equal(inputs, x) and torch.equal(targets, y)


def test_loss_decreases(spec):
    model = make_model()
    driver = Driver(model, build(spec, model))
    before = full_loss(model)
    for _ in range(3 * BATCHES):
        driver.step()
    assert full_loss(model) < before


def test_state_dict_save_load_continue_equals_uninterrupted_run(spec):
    model = make_model()
    uninterrupted = Driver(model, build(spec, model))
    for _ in range(10):
        uninterrupted.step()

    model = make_model()
    first = Driver(model, build(spec, model))
    for _ in range(6):
        first.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    optimizer = build(spec, resumed_model)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    resumed = Driver(resumed_model, optimizer)
    resumed.position = first.position
    for _ in range(4):
        resumed.step()
    torch.testing.assert_close(flat(resumed_model), flat(uninterrupted.model), rtol=0, atol=0)


def test_lr_scheduler_drives_every_group(spec):
    model = make_model()
    optimizer = build(spec, model)
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
    """torch's convention: ``step(closure)`` returns the closure's loss (one of its losses,
    for an optimizer that calls it several times). A per-example optimizer takes no closure."""
    model = make_model()
    optimizer = build(spec, model)
    driver = Driver(model, optimizer)
    protocol = classical_protocol(optimizer)
    if protocol.per_example:
        with pytest.raises(ValueError, match="closure"):
            optimizer.step(lambda: None, indices=torch.arange(2), per_example_grads=[])
        return
    if protocol.closure is None:  # torch's optional closure: it computes the gradient
        (batch,) = driver.stream.next()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = driver.loss_fn(model(batch[0]), batch[1])
            loss.backward()
            return loss

        returned = optimizer.step(closure)
    else:
        returned = driver.step().returned
    assert any(torch.equal(torch.as_tensor(returned), loss.detach()) for loss in driver.losses)


def test_parameters_without_gradient_are_skipped(spec):
    model = make_model()
    driver = Driver(model, build(spec, model))
    for _ in range(3):
        driver.step()
    assert model.unused.grad is None
    assert torch.equal(model.unused.detach(), torch.ones(4, 2, dtype=torch.float64))


def test_negative_learning_rate_raises_naming_it(spec):
    with pytest.raises(ValueError, match="-0.5"):
        build(spec, make_model(), lr=-0.5)


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
    original = Driver(model, build(spec, model))
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


@pytest.mark.parametrize("spec", specs())
def test_late_parameter_steps_like_a_fresh_optimizer(spec):
    """``b`` has no gradient for 5 steps (only ``a`` is trained), then joins (only ``b``).

    Its 4 steps equal those of a fresh optimizer built on ``b`` alone: its state (step
    counts, bias corrections) starts when it joins, as torch's Adam keeps it. An
    optimizer that couples its parameters (a shared curvature memory or snapshot
    schedule) cannot promise that; for it ``b`` must step, ``a`` must stay where it
    is, and the state saved half-way must continue exactly as the original.
    """
    a, b = _two_matrices()
    fresh_b = nn.Parameter(b.detach().clone())
    optimizer = build(spec, [a, b])
    early = Driver(MatrixModel(a), optimizer)
    for _ in range(5):
        early.step()
    assert b.grad is None and torch.equal(b, fresh_b)

    late = Driver(MatrixModel(b), optimizer)
    late.position = early.position
    if spec.couples_parameters:
        a_before = a.detach().clone()
        for _ in range(2):
            late.step()
        saved, middle = (
            copy.deepcopy(optimizer.state_dict()),
            [a.detach().clone(), b.detach().clone()],
        )
        for _ in range(2):
            late.step()
        assert torch.equal(a, a_before) and not torch.equal(b, fresh_b)
        assert torch.isfinite(b).all()
        a_copy, b_copy = (nn.Parameter(w) for w in middle)
        reloaded = build(spec, [a_copy, b_copy])
        reloaded.load_state_dict(saved)
        again = Driver(MatrixModel(b_copy), reloaded)
        again.position = early.position + 2
        for _ in range(2):
            again.step()
        assert torch.equal(b_copy, b)
        return
    fresh = Driver(MatrixModel(fresh_b), build(spec, [fresh_b]))
    fresh.position = early.position
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
    optimizer = build(spec, model)
    protocol = classical_protocol(optimizer)
    if not (protocol.gradient_before_step or (protocol.closure and protocol.closure_backward)):
        pytest.skip("takes no .grad: its gradients come from torch.func or autograd.grad (dense)")
    driver = Driver(model, optimizer)
    dense_model = make_model()
    dense = Driver(dense_model, build(spec, dense_model))
    for _ in range(2):
        driver.step()
        dense.step()
    last = optimizer.param_groups[-1]["params"][-1]
    assert any(last is p for p in model.net.parameters())
    state_before = copy.deepcopy(optimizer.state_dict())
    params_before = flat(model)
    last.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", p.grad.to_sparse()))
    try:
        driver.step()
    except RuntimeError as error:
        assert "sparse" in str(error)
        assert torch.equal(flat(model), params_before)
        assert_same(optimizer.state_dict(), state_before)
        return
    dense.step()
    torch.testing.assert_close(flat(model), flat(dense_model), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", specs())
def test_meta_parameters_step(spec):
    """A model on the ``meta`` device: steps run and state keeps the parameters' shapes there.

    An optimizer declared ``steps_on_meta=False`` (its control flow reads values) refuses
    meta parameters when it is built, naming them.
    """
    model = make_model().to("meta")
    if not spec.steps_on_meta:
        with pytest.raises(ValueError, match="meta tensors"):
            build(spec, model)
        return
    optimizer = build(spec, model)
    driver = Driver(model, optimizer, device="meta")
    for _ in range(2):
        driver.step()
    for param in model.parameters():
        assert param.is_meta
    # a parameter's state tensors of its own shape (moments, buffers) live with it, and so
    # do state tensors over the flattened parameters (the L-BFGS family's memory)
    flat_size = sum(p.numel() for p in model.parameters())
    tensors = [
        value
        for optimizer_ in (optimizer, getattr(optimizer, "base_optimizer", None))
        if optimizer_ is not None
        for param, state in optimizer_.state.items()
        for value in (state.values() if torch.is_tensor(param) else ())
        if torch.is_tensor(value)
        and value.dim() > 0
        and (value.shape == param.shape or value.shape[-1] == flat_size)
    ]
    assert tensors and all(t.is_meta for t in tensors)


#: the optimizers whose arguments lack ``maximize``, and why; every other one must accept it
REJECTS_MAXIMIZE = {
    "svrg": "not implemented: its variance-reduced step is written for minimization",
    "saga": "not implemented: its variance-reduced step is written for minimization",
    "newton-cg": "not implemented: its line search and curvature steps minimize",
    "olbfgs": "not implemented: its curvature pairs and damping are written for minimization",
    "sqn": "not implemented: its curvature pairs and damping are written for minimization",
    "lbfgs": "not implemented: its Armijo line search minimizes",
    "dmsgd": "not implemented by the decentralized update rules",
    "decentlam": "not implemented by the decentralized update rules",
    "slowmo": "wraps a decentralized optimizer, which takes no maximize",
}


def test_every_optimizer_accepts_maximize_but_the_listed():
    """Acceptance is read from the arguments, so a new optimizer without it must be listed."""
    lacking = {
        spec.name
        for spec in list_optimizers()
        if "maximize" not in optimizer_arguments(spec.name).defaults
    }
    assert lacking == set(REJECTS_MAXIMIZE)


class LinearLoss(nn.Module):
    """``<weight, c>`` whatever the inputs: a loss linear in the parameters."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64))
        self.register_buffer("c", torch.randn(3, 2, generator=generator, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.c).sum()


@pytest.mark.parametrize("spec", specs())
def test_maximize_equals_minimizing_the_negated_loss(spec):
    """``maximize=True`` on ``f`` and the default on ``-f`` step alike; without it ``f`` differs;
    one step with it on a linear loss increases the loss.

    An optimizer of :data:`REJECTS_MAXIMIZE` must reject it by name.
    """
    model = make_model()
    if spec.name in REJECTS_MAXIMIZE:
        with pytest.raises(TypeError, match="maximize"):
            build(spec, model, maximize=True)
        return
    maximizing = Driver(model, build(spec, model, maximize=True))
    negated_model, plain_model = make_model(), make_model()
    negated = Driver(negated_model, build(spec, negated_model), sign=-1.0)
    plain = Driver(plain_model, build(spec, plain_model))
    for _ in range(5):
        maximizing.step()
        negated.step()
        plain.step()
    torch.testing.assert_close(flat(model), flat(negated_model), rtol=1e-12, atol=0)
    assert full_loss(model) > full_loss(plain_model)

    linear = LinearLoss()
    before = linear(None).item()
    Driver(linear, build(spec, linear, maximize=True), loss=lambda f, targets: f).step()
    assert linear(None).item() > before


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
    optimizer = build(spec, model)
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


#: every check above that takes a spec, by name, its other parameters bound: the contract
#: the decentralized optimizers keep too (``test_contract_decentralized.py``)
CHECKS: dict[str, Callable[[OptimizerSpec], None]] = {
    "loss-decreases": test_loss_decreases,
    "state-dict": test_state_dict_save_load_continue_equals_uninterrupted_run,
    "lr-scheduler": test_lr_scheduler_drives_every_group,
    "closure": test_step_with_closure_returns_the_loss,
    "no-gradient": test_parameters_without_gradient_are_skipped,
    "negative-lr": test_negative_learning_rate_raises_naming_it,
    **{
        f"copy-{copier}": functools.partial(
            test_copy_continues_exactly_as_the_original, copier=copier
        )
        for copier in COPIERS
    },
    "late-parameter": test_late_parameter_steps_like_a_fresh_optimizer,
    "sparse": test_sparse_gradient_is_supported_or_rejected_before_anything_changes,
    "meta": test_meta_parameters_step,
    "maximize": test_maximize_equals_minimizing_the_negated_loss,
    **{
        f"scheduler-{name}": functools.partial(
            test_schedulers_change_lr_and_momentum, scheduler=name
        )
        for name in SCHEDULERS
    },
}


def test_every_check_of_a_spec_is_in_checks():
    """So that a new check reaches the decentralized optimizers too."""
    checks = {getattr(check, "func", check) for check in CHECKS.values()}
    taking_a_spec = {
        value
        for name, value in globals().items()
        if name.startswith("test_") and "spec" in inspect.signature(value).parameters
    }
    assert taking_a_spec == checks
