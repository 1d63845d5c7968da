"""largebatch: large-batch training for PyTorch.

Optimizers that keep accuracy as the batch grows (``largebatch.optim``), the
diagnostics that explain why it drops (``largebatch.diagnostics``), a training
engine (``largebatch.train``) and batch-size studies (``largebatch.experiments``).
"""

from largebatch.optim import create_optimizer, list_optimizers

__version__ = "0.1.0"

__all__ = ["__version__", "create_optimizer", "list_optimizers"]
