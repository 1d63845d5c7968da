"""largebatch: large-batch training for PyTorch.

Optimizers that keep accuracy as the batch grows (``largebatch.optim``), the
diagnostics that explain why it drops (``largebatch.diagnostics``), a training
engine (``largebatch.train``) and batch-size studies (``largebatch.experiments``).

``create_optimizer`` and ``list_optimizers`` are imported on first use, so that
``import largebatch`` (and ``largebatch --help``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_optimizer", "list_optimizers"]

if TYPE_CHECKING:
    from largebatch.optim import create_optimizer, list_optimizers


def __getattr__(name: str) -> Any:
    if name in ("create_optimizer", "list_optimizers"):
        from largebatch import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")
