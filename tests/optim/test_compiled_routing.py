"""The compiled path's routing of small tensors, and its use of ``p.grad`` as scratch."""

import pytest
import torch
from layerwise_problem import make_problem, train
from torch._dynamo.utils import counters

import largebatch.optim._base as base
from largebatch.optim import create_optimizer, param_groups

LAYERWISE = ["lars", "lamb", "alto"]


def _trajectory(name, switch, steps=4):
    model, batches = make_problem(steps)
    optimizer = create_optimizer(name, param_groups(model, 1e-2, layerwise=True), lr=1e-2, **switch)
    return train(model, optimizer, batches)


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


@pytest.mark.parametrize("name", ["lamb", "alto"])
def test_compiled_step_leaves_the_direction_in_grad(name):
    """First step, eps 0: r = m_hat / sqrt(v_hat) + wd w = sign(g) + wd w (E: ghat = g)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5, generator=generator, dtype=torch.float64))
    gradient = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    before = weight.detach().clone()
    hyper = {"lr": 0.1, "eps": 0.0, "weight_decay": 0.01}
    if name == "alto":
        hyper.update(eps2=0.0, eps3=0.0)
    for switch in ({"foreach": False}, {"foreach": True}, {"compiled": True}):
        with torch.no_grad():
            weight.copy_(before)
        weight.grad = gradient.clone()
        create_optimizer(name, [weight], **hyper, **switch).step()
        if "compiled" in switch:
            torch.testing.assert_close(weight.grad, gradient.sign() + 0.01 * before)
        else:
            assert torch.equal(weight.grad, gradient)  # the reference paths keep p.grad
