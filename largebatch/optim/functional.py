"""Functional forms of the layer-wise optimizers, over lists of tensors (like ``torch.optim.adamw.adamw``).

Each function performs one step in place on parallel lists (parameters, gradients,
state buffers, step counts) and is what the matching class calls once per parameter
group; the classes add validation, state creation and ``state_dict``. Example::

    from largebatch.optim.functional import lamb
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    lamb(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, steps,
         lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
"""

from largebatch.optim.alto import alto
from largebatch.optim.lamb import lamb
from largebatch.optim.lars import lars

__all__ = ["alto", "lamb", "lars"]
