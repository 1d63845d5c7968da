"""Problems with known solutions for the classical methods' tests.

* :class:`LogReg`: L2-regularised binary logistic regression on the library's
  ``logreg`` task (sparse tf-idf features), in float64, with its optimum from
  SciPy's L-BFGS-B run to machine precision (an independent solver).
* :class:`NoisyQuadratic`: ``F(w) = 1/2 (w - w*)^T H (w - w*)`` with diagonal
  ``H`` and the oracle gradient ``H (w - w*) + sigma z``; ``R`` independent
  replicas (one per row of the parameter) run at once, so a Monte Carlo
  average over seeds is one run. The expected optimality gap follows an exact
  recursion (research notes, part A.2).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.tasks.logreg import logreg


class LogReg:
    """``F(w) = mean_i CE(W x_i + b, y_i) + wd/2 (||W||^2 + ||b||^2)`` on ``logreg`` data."""

    def __init__(
        self,
        num_train: int = 200,
        num_features: int = 20,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> None:
        task = logreg(
            num_train=num_train,
            num_test=10,
            num_features=num_features,
            val_fraction=0.0,
            seed=seed,
        )
        features, labels = task.train.tensors
        self.X = features.double()
        self.y = labels
        self.n, self.d = self.X.shape
        self.weight_decay = weight_decay

    def model(self, seed: int = 0) -> nn.Linear:
        torch.manual_seed(seed)
        return nn.Linear(self.d, 2).double()

    def data_loss(
        self, model: nn.Module, index: torch.Tensor | slice = slice(None)
    ) -> torch.Tensor:
        """Mean cross-entropy over the examples ``index`` (no regulariser)."""
        return F.cross_entropy(model(self.X[index]), self.y[index])

    def objective(self, model: nn.Module) -> float:
        """``F`` at the model's weights."""
        with torch.no_grad():
            penalty = sum(p.pow(2).sum() for p in model.parameters())
            return float(self.data_loss(model) + 0.5 * self.weight_decay * penalty)

    def _function(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        flat = torch.tensor(w, requires_grad=True)
        weight, bias = flat[: 2 * self.d].view(2, self.d), flat[2 * self.d :]
        loss = F.cross_entropy(self.X @ weight.T + bias, self.y)
        loss = loss + 0.5 * self.weight_decay * flat.pow(2).sum()
        (gradient,) = torch.autograd.grad(loss, flat)
        return float(loss.detach()), gradient.numpy()

    @cached_property
    def solution(self) -> tuple[np.ndarray, float]:
        """``(w*, F*)`` by L-BFGS-B to machine precision (w* flattened as ``weight, bias``)."""
        result = scipy.optimize.minimize(
            self._function,
            np.zeros(2 * self.d + 2),
            jac=True,
            method="L-BFGS-B",
            options={"gtol": 1e-14, "ftol": 1e-16, "maxiter": 10_000},
        )
        return result.x, float(result.fun)

    def suboptimality(self, model: nn.Module) -> float:
        return self.objective(model) - self.solution[1]

    def gradient_closure(self, model: nn.Module, optimizer, index=slice(None)) -> Callable:
        """The torch convention: zero grads, data loss on ``index``, backward, return it."""

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = self.data_loss(model, index)
            loss.backward()
            return loss

        return closure


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class NoisyQuadratic(nn.Module):
    """``R`` replicas of ``F(w) = 1/2 sum_i h_i (w_i - w*_i)^2`` with gradient noise ``sigma``.

    The parameter is ``(R, d)``; :meth:`noisy_gradient_` writes the oracle
    gradient ``H (w - w*) + (sigma / sqrt(batch)) z`` into ``.grad``.
    """

    def __init__(
        self,
        curvatures: list[float],
        sigma: float,
        replicas: int,
        start: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.h = torch.tensor(curvatures, dtype=torch.float64)
        self.sigma = sigma
        self.w = nn.Parameter(torch.full((replicas, len(curvatures)), start, dtype=torch.float64))
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def c(self) -> float:
        return float(self.h.min())

    @property
    def L(self) -> float:
        return float(self.h.max())

    def noise_variance(self, batch: int = 1) -> float:
        """``M = E||g - grad F||^2 = sigma^2 d / batch``."""
        return self.sigma**2 * len(self.h) / batch

    def noisy_gradient_(self, batch: int = 1) -> None:
        noise = torch.randn(self.w.shape, generator=self.generator, dtype=torch.float64)
        self.w.grad = self.h * self.w.detach() + self.sigma / batch**0.5 * noise

    def gaps(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``F(w) - F*`` for every replica."""
        w = self.w.detach() if weights is None else weights
        return 0.5 * (self.h * w * w).sum(dim=1)

    def expected_gap(self, steps: list[float], start: float = 1.0, batch: int = 1) -> list[float]:
        """The exact ``E[F(w_k) - F*]`` after each step size in ``steps`` (k = 0, 1, ...)."""
        second_moment = torch.full_like(self.h, start**2)
        gaps = [float(0.5 * (self.h * second_moment).sum())]
        for lr in steps:
            second_moment = (1 - lr * self.h) ** 2 * second_moment + lr**2 * self.sigma**2 / batch
            gaps.append(float(0.5 * (self.h * second_moment).sum()))
        return gaps
