"""A strongly convex problem split unevenly over n ranks, and the closed forms the tests check.

Rank i holds m_i least-squares examples (m_i differ: 3 to 60), so its loss
``f_i(x) = ||D_i x - y_i||^2 / (2 m_i) + lam/2 ||x||^2`` has its own Hessian
``A_i = D_i^T D_i / m_i + lam I`` and minimiser: the data are heterogeneous. The global
objective is ``f = (1/n) sum_i f_i`` (each rank's mean loss weighted equally, as in the
decentralized literature). Everything is float64 and computed from the definitions.

:func:`simulate` runs an algorithm's own ``prepare``/``finish`` for all n ranks in one
process: their iterates are the rows of one tensor (every operation but the gossip is
elementwise) and the gossip is ``W @`` those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from largebatch.optim.decentralized.decentlam import decentlam_finish, decentlam_prepare
from largebatch.optim.decentralized.dmsgd import VARIANTS

LAM = 0.5
LR, BETA, DECAY = 0.05, 0.9, 0.01  # the algorithms' settings in the tests
SIZES = (3, 10, 25, 60, 7, 40, 15, 5)  # examples per rank (the first n are used)


@dataclass
class Quadratics:
    hessians: torch.Tensor  # (n, d, d): A_i
    linear: torch.Tensor  # (n, d): b_i = D_i^T y_i / m_i, so grad f_i(x) = A_i x - b_i

    @classmethod
    def make(cls, n: int, d: int = 4, seed: int = 0) -> Quadratics:
        generator = torch.Generator().manual_seed(seed)
        hessians, linear = [], []
        for i in range(n):
            m = SIZES[i % len(SIZES)]
            data = torch.randn(m, d, generator=generator, dtype=torch.float64)
            shift = 3.0 * torch.randn(
                d, generator=generator, dtype=torch.float64
            )  # per-rank optimum
            targets = data @ shift + 0.1 * torch.randn(m, generator=generator, dtype=torch.float64)
            hessians.append(data.T @ data / m + LAM * torch.eye(d, dtype=torch.float64))
            linear.append(data.T @ targets / m)
        return cls(torch.stack(hessians), torch.stack(linear))

    @property
    def n(self) -> int:
        return self.hessians.shape[0]

    @property
    def d(self) -> int:
        return self.hessians.shape[1]

    def gradients(self, x: torch.Tensor) -> torch.Tensor:
        """Row i: ``grad f_i(x_i)`` for stacked iterates ``x`` (n, d)."""
        return torch.einsum("ijk,ik->ij", self.hessians, x) - self.linear

    def optimum(self) -> torch.Tensor:
        """``x°``: ``(sum_i A_i) x = sum_i b_i``."""
        return torch.linalg.solve(self.hessians.sum(0), self.linear.sum(0))

    def dsgd_fixed_point(self, mixing: torch.Tensor, step: float) -> torch.Tensor:
        """The stacked ``X`` with ``X = W (X - step * grad F(X))``: DSGD's limit at ``step``.

        Linear in X: ``(I - W) X + step W A X = step W b``, solved as one (n d) system.
        """
        n, d = self.n, self.d
        identity = torch.eye(n * d, dtype=torch.float64)
        w = torch.kron(mixing, torch.eye(d, dtype=torch.float64))
        block = torch.block_diag(*self.hessians)
        system = identity - w + step * w @ block
        return torch.linalg.solve(system, step * w @ self.linear.reshape(-1)).reshape(n, d)

    def bias(self, x: torch.Tensor) -> float:
        """``(1/n) sum_i ||x_i - x°||^2``."""
        return (x - self.optimum()).square().sum(1).mean().item()


def phases(algorithm: str):
    """``(prepare, finish)`` of a DmSGD variant or of ``"decentlam"``."""
    return (
        (decentlam_prepare, decentlam_finish) if algorithm == "decentlam" else VARIANTS[algorithm]
    )


def simulate(algorithm, problem, mixing, steps, *, lr=LR, beta=BETA, decay=DECAY, nesterov=False,
             foreach=None, noise=0.0, split=False):  # fmt: skip
    """Iterates (stacked) after each of ``steps`` steps, from x = 0, through the optimizer's
    own ``prepare``/``finish``. ``mixing`` is W, or a list of one W per step; ``noise`` adds
    N(0, noise^2) to every gradient entry; ``split`` hands the columns over as two tensors
    (two "parameters")."""
    prepare, finish = phases(algorithm)
    x = torch.zeros(problem.n, problem.d, dtype=torch.float64, device=problem.linear.device)
    m = torch.zeros_like(x)
    generator = torch.Generator().manual_seed(7)
    settings = dict(lr=lr, momentum=beta, weight_decay=decay, nesterov=nesterov, foreach=foreach)
    trajectory = []
    for step in range(steps):
        matrix = mixing[step] if isinstance(mixing, list) else mixing
        grad = problem.gradients(x)
        if noise:
            grad = grad + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x)
        params, grads, buffers = ([t[:, :2], t[:, 2:]] if split else [t] for t in (x, grad, m))
        outgoing = prepare(params, grads, buffers, **settings)
        for tensor in outgoing:
            tensor.copy_(matrix @ tensor)
        finish(params, grads, buffers, outgoing, **settings)
        trajectory.append(x.clone())
    return trajectory
