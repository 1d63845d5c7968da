"""The execution paths of LARS, LAMB and ALTO: small-tensor routing, ``p.grad``, ``maximize``.

Every path keeps the caller's gradient; ``overwrite_grad=True`` (LAMB, ALTO) makes every
path leave the update direction there instead, and changes nothing else.
"""

import pytest
import torch
from layerwise_problem import flat_parameters, loss_of, make_problem
from torch._dynamo.utils import counters

import largebatch.optim._base as base
from largebatch.optim import create_optimizer, param_groups

LAYERWISE = ["lars", "lamb", "alto"]


def _trajectory(name, switch, steps=4, sign=1.0):
    """Parameters after each step on the layer-wise problem, the loss multiplied by ``sign``."""
    model, batches = make_problem(steps)
    optimizer = create_optimizer(name, param_groups(model, 1e-2, layerwise=True), lr=1e-2, **switch)
    trajectory = []
    for batch in batches:
        optimizer.zero_grad()
        (sign * loss_of(model, batch)).backward()
        optimizer.step()
        trajectory.append(flat_parameters(model))
    return trajectory


@pytest.mark.parametrize("name", LAYERWISE)
def test_small_tensors_take_the_multi_tensor_step(name, monkeypatch):
    """Below the threshold nothing compiles; across it, both parts agree with foreach."""
    reference = _trajectory(name, {"foreach": True})

    monkeypatch.setattr(base, "COMPILE_MIN_NUMEL", 10_000)  # above every tensor of the MLP
    graphs = counters["stats"]["unique_graphs"]
    all_small = _trajectory(name, {"compiled": True})
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(ours, expected) for ours, expected in zip(all_small, reference))

    monkeypatch.setattr(base, "COMPILE_MIN_NUMEL", 9)  # the 4x8 and 8x3 weights compile
    mixed = _trajectory(name, {"compiled": True})
    for ours, expected in zip(mixed, reference):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


SWITCHES = ({"foreach": False}, {"foreach": True}, {"compiled": True})


@pytest.mark.parametrize("name", LAYERWISE)
def test_every_path_keeps_the_callers_gradient(name):
    """After ``step()``, ``p.grad`` is the gradient the caller computed, on every path."""
    for switch in SWITCHES:
        model, batches = make_problem(2)
        optimizer = create_optimizer(name, model, lr=1e-2, **switch)
        for batch in batches:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            before = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            for param, grad in zip(model.parameters(), before):
                assert torch.equal(param.grad, grad), switch


@pytest.mark.parametrize("name", ["lamb", "alto"])
def test_overwrite_grad_leaves_the_direction_in_grad_on_every_path(name):
    """First step, eps 0: r = m_hat / sqrt(v_hat) + wd w = sign(g) + wd w (E: ghat ~ g)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5, generator=generator, dtype=torch.float64))
    gradient = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    before = weight.detach().clone()
    hyper = {"lr": 0.1, "eps": 0.0, "weight_decay": 0.01, "overwrite_grad": True}
    if name == "alto":
        hyper.update(eps2=0.0, eps3=0.0)
    moved = []
    for switch in SWITCHES:
        with torch.no_grad():
            weight.copy_(before)
        weight.grad = gradient.clone()
        create_optimizer(name, [weight], **hyper, **switch).step()
        torch.testing.assert_close(weight.grad, gradient.sign() + 0.01 * before)
        moved.append(weight.detach().clone())
    for other in moved[1:]:
        torch.testing.assert_close(other, moved[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["lamb", "alto"])
def test_overwrite_grad_changes_nothing_but_grad(name):
    """The trajectory with ``overwrite_grad=True`` is the default one, on every path."""
    reference = _trajectory(name, {"foreach": True})
    for switch in SWITCHES:
        ours = _trajectory(name, {"overwrite_grad": True, **switch})
        for step, expected in zip(ours, reference):
            torch.testing.assert_close(step, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", LAYERWISE)
def test_maximize_equals_minimizing_the_negated_loss_on_every_path(name):
    """``maximize=True`` on ``f`` and the default on ``-f``: the same trajectory, bit for bit."""
    for switch in SWITCHES:
        maximizing = _trajectory(name, {"maximize": True, **switch})
        negated = _trajectory(name, switch, sign=-1.0)
        assert all(torch.equal(a, b) for a, b in zip(maximizing, negated)), switch
        assert not torch.equal(maximizing[-1], _trajectory(name, switch)[-1])
