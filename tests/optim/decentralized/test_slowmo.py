"""SlowMo without processes: its outer step against the paper's equations, its checks and
its registry entry (``test_gossip_processes.py`` runs it on four gloo ranks)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from largebatch.optim import create_optimizer
from largebatch.optim.decentralized import DmSGD, SlowMo, slowmo
from largebatch.optim.registry import is_decentralized, optimizer_arguments


def _outer_reference(anchor, average, buffer, lr, beta, alpha):
    """Wang et al.'s outer step in float64 lists: u <- beta u + (x0 - xbar) / lr;
    x0 <- x0 - alpha lr u (the new parameters)."""
    buffer = [beta * u + (a - x) / lr for u, a, x in zip(buffer, anchor, average)]
    anchor = [a - alpha * lr * u for a, u in zip(anchor, buffer)]
    return anchor, buffer


@pytest.mark.parametrize("foreach", [False, True])
def test_the_outer_step_is_the_papers(foreach):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (5,)]
    average = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    anchor = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    buffer = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    expected_params, expected_buffer = _outer_reference(anchor, average, buffer, 0.1, 0.6, 0.8)
    params, anchors, buffers = (copy.deepcopy(t) for t in (average, anchor, buffer))
    slowmo(params, anchors, buffers, lr=0.1, slow_momentum=0.6, slow_lr=0.8, foreach=foreach)
    for got, want in zip(params + anchors + buffers, 2 * expected_params + expected_buffer):
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


def test_without_slow_momentum_and_at_slow_lr_one_the_average_is_kept():
    """beta = 0, alpha = 1: x0 - lr (x0 - xbar) / lr = xbar (periodic averaging)."""
    average = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    params, anchors = [average[0].clone()], [torch.tensor([4.0, 4.0], dtype=torch.float64)]
    slowmo(params, anchors, [torch.zeros(2, dtype=torch.float64)], lr=0.3, slow_momentum=0.0,
           slow_lr=1.0)  # fmt: skip
    torch.testing.assert_close(params[0], average[0], rtol=0, atol=1e-15)


def test_a_zero_learning_rate_is_refused_at_the_outer_step():
    with pytest.raises(ValueError, match="Invalid learning rate: 0.0 \\(SlowMo divides by it"):
        slowmo([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], lr=0.0, slow_momentum=0.5,
               slow_lr=1.0)  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"slow_every": 0}, "Invalid slow_every: 0"),
        ({"slow_every": 2.5}, "Invalid slow_every: 2.5"),
        ({"slow_momentum": 1.0}, "Invalid slow_momentum: 1.0"),
        ({"slow_momentum": -0.1}, "Invalid slow_momentum: -0.1"),
        ({"slow_lr": 0.0}, "Invalid slow_lr: 0.0"),
        ({"slow_lr": float("nan")}, "Invalid slow_lr: nan"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(settings, message):
    base = DmSGD([torch.zeros(2, requires_grad=True)], lr=0.1, topology="ring")
    with pytest.raises(ValueError, match=message):
        SlowMo(base, **settings)


def test_a_base_that_all_reduces_is_refused():
    with pytest.raises(TypeError, match="Invalid base optimizer: a SGD; SlowMo wraps a decentr"):
        SlowMo(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1))


def test_the_registry_builds_it_over_dmsgd_and_calls_it_decentralized():
    model = torch.nn.Linear(3, 2)
    optimizer = create_optimizer("slowmo", model, topology="ring", slow_every=4, variant="awc")
    assert isinstance(optimizer.base_optimizer, DmSGD)
    assert optimizer.param_groups[0]["variant"] == "awc"
    assert optimizer.param_groups[0]["slow_every"] == 4
    assert is_decentralized("slowmo") and is_decentralized("slowmo", base="decentlam")
    defaults = optimizer_arguments("slowmo", base="decentlam").defaults
    assert defaults["base"] == "decentlam" and defaults["slow_lr"] == 1.0
    assert optimizer.step_protocol.local_gradients  # the loop leaves the gradients local
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.state_dict() == optimizer.state_dict()
