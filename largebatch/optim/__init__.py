"""Large-batch optimizers, each a ``torch.optim.Optimizer``, and the registry that builds them."""

from largebatch.optim.param_groups import param_groups
from largebatch.optim.protocol import StepProtocol, step_protocol_of
from largebatch.optim.registry import (
    OptimizerSpec,
    create_optimizer,
    get_spec,
    list_optimizers,
    register,
)

__all__ = [
    "OptimizerSpec",
    "StepProtocol",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "param_groups",
    "register",
    "step_protocol_of",
]
