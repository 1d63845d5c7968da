"""Shampoo: blocked Kronecker-factored preconditioning with grafting and stale, sharded inverse roots."""

from largebatch.optim.shampoo.config import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    CoupledNewtonConfig,
    DistributedConfig,
    EighConfig,
    RMSpropGraftingConfig,
    RootConfig,
    SGDGraftingConfig,
)
from largebatch.optim.shampoo.optimizer import Shampoo
from largebatch.optim.shampoo.roots import FactorReport, RootComputationError

__all__ = [
    "AdaGradGraftingConfig",
    "AdamGraftingConfig",
    "CoupledNewtonConfig",
    "DistributedConfig",
    "EighConfig",
    "FactorReport",
    "RMSpropGraftingConfig",
    "RootComputationError",
    "RootConfig",
    "SGDGraftingConfig",
    "Shampoo",
]
