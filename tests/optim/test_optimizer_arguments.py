"""``optimizer_arguments``: what ``create_optimizer`` accepts for each optimizer, and its lr."""

from __future__ import annotations

import inspect

import pytest
import torch

from largebatch.optim import create_optimizer, list_optimizers
from largebatch.optim.registry import get_spec, optimizer_arguments


@pytest.mark.parametrize("name", [spec.name for spec in list_optimizers()])
def test_every_accepted_argument_is_accepted_and_the_lr_is_the_one_used(name):
    """Passing every reported default back to ``create_optimizer`` builds the optimizer, and
    an optimizer built without ``lr`` has the reported learning rate."""
    arguments = optimizer_arguments(name)
    param = torch.nn.Parameter(torch.zeros(3))
    data = {key: 10 for key in get_spec(name).data_arguments}  # what a run fills in
    given = {k: v for k, v in arguments.defaults.items() if v is not None} | data
    built = create_optimizer(name, [param], **given)
    plain = create_optimizer(name, [torch.nn.Parameter(torch.zeros(3))], **data)
    groups = getattr(plain, "base_optimizer", plain).param_groups
    assert groups[0]["lr"] == arguments.lr
    assert built is not None
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        create_optimizer(name, [param], not_an_argument=1, **data)


def test_a_missing_data_argument_is_named():
    with pytest.raises(TypeError, match=r"saga: missing data argument\(s\) \['num_examples'\]"):
        create_optimizer("saga", [torch.nn.Parameter(torch.zeros(3))])


def test_a_wrapper_reports_the_arguments_and_lr_of_its_base():
    e_default, e_lamb = optimizer_arguments("e"), optimizer_arguments("e", base="lamb")
    assert e_default.lr == get_spec("adamw").defaults["lr"]
    assert e_lamb.lr == get_spec("lamb").defaults["lr"]
    assert "bias_correction" in e_lamb.defaults and "bias_correction" not in e_default.defaults
    assert "amsgrad" in e_default.defaults and "amsgrad" not in e_lamb.defaults
    assert e_lamb.defaults["base"] == "lamb" and e_lamb.defaults["alpha"] == -5.0
    with pytest.raises(ValueError, match="'sgd' does not wrap"):
        optimizer_arguments("sgd", base="lamb")
    with pytest.raises(KeyError, match="Unknown optimizer"):
        optimizer_arguments("e", base="nope")


def test_an_integer_default_of_a_float_argument_reads_as_a_float():
    """torch's ``SGD(dampening: float = 0)``: 0.5 is a valid dampening, so the default is 0.0."""
    assert inspect.signature(torch.optim.SGD).parameters["dampening"].default == 0
    assert optimizer_arguments("sgd").defaults["dampening"] == 0.0
    assert isinstance(optimizer_arguments("sgd").defaults["dampening"], float)
    assert isinstance(optimizer_arguments("shampoo").defaults["precondition_frequency"], int)
