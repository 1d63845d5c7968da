"""The shared wrapper machinery (largebatch/optim/wrapper.py) for each wrapper optimizer.

A copy (deepcopy, pickle) or a checkpoint (``torch.save``/``torch.load(weights_only=True)``)
must carry the base optimizer and the wrapper's own state, so the copy continues exactly
as the original does.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from state_compare import assert_same

from largebatch.optim.e_adaptor import E
from largebatch.optim.extrapolation import Extrapolation
from largebatch.optim.protocol import step_protocol_of

WRAPPERS = {
    "e": lambda params: E(torch.optim.SGD(params, lr=0.1, momentum=0.9), alpha=-2.0, beta1=0.9),
    # The seeded noise generator is wrapper state beyond tensors in ``state``.
    "extrapolation": lambda params: Extrapolation(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), variant="noise", noise_seed=5
    ),
}
TARGET = torch.tensor([1.0, -2.0, 0.5])


def make_params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True), torch.ones(2, 3, requires_grad=True)]


def train(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 0
) -> None:
    """Steps on a noisy quadratic (noise seeded by ``seed``), driven as the step protocol asks."""
    protocol = step_protocol_of(optimizer)
    generator = torch.Generator().manual_seed(seed)

    def closure() -> torch.Tensor:
        noise = torch.randn(3, generator=generator)
        loss = sum(((p - TARGET - noise) ** 2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.zero_grad()
        if protocol.gradient_before_step:
            closure()
        optimizer.step(closure if protocol.closure else None)


def assert_continues_identically(original, params, restored, restored_params) -> None:
    """``restored`` shares its base's groups, equals ``original`` and keeps doing so."""
    assert restored.param_groups[0] is restored.base_optimizer.param_groups[0]
    assert_same(original.state_dict(), restored.state_dict())
    train(original, params, 3, seed=1)
    train(restored, restored_params, 3, seed=1)
    for param, restored_param in zip(params, restored_params):
        assert torch.equal(param, restored_param)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))])
@pytest.mark.parametrize("name", WRAPPERS)
def test_copy_keeps_the_base_optimizer_and_continues_identically(name, copier):
    params = make_params()
    optimizer = WRAPPERS[name](params)
    train(optimizer, params, 2)
    params_copy, optimizer_copy = copier((params, optimizer))

    assert type(optimizer_copy.base_optimizer) is torch.optim.SGD
    assert optimizer_copy.base_optimizer is not optimizer.base_optimizer
    assert optimizer_copy.param_groups[0]["params"][0] is params_copy[0]
    assert optimizer_copy.step_protocol == optimizer.step_protocol
    assert_continues_identically(optimizer, params, optimizer_copy, params_copy)


@pytest.mark.parametrize("name", WRAPPERS)
def test_state_dict_round_trips_through_weights_only_load(name):
    params = make_params()
    optimizer = WRAPPERS[name](params)
    train(optimizer, params, 2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(optimizer.state_dict(), loaded)
    assert loaded["base_optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0

    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = WRAPPERS[name](resumed_params)
    resumed.load_state_dict(loaded)
    assert_continues_identically(optimizer, params, resumed, resumed_params)


@pytest.mark.parametrize("name", WRAPPERS)
def test_loading_a_state_dict_without_base_optimizer_is_an_error(name):
    optimizer = WRAPPERS[name](make_params())
    state_dict = optimizer.state_dict()
    del state_dict["base_optimizer"]
    with pytest.raises(ValueError, match="no 'base_optimizer' entry"):
        optimizer.load_state_dict(state_dict)
