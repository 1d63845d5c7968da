"""Communication graphs of decentralized training, and their mixing matrices.

A topology says, for every process (rank) ``i`` and step ``k``, which ranks' tensors
``i`` receives and with which weights it averages them: ``x_i <- sum_j w_ij x_j``. The
weights of all ranks form the mixing matrix ``W`` (row ``i`` is rank ``i``'s weights);
every matrix here is doubly stochastic (rows and columns sum to 1), so gossip keeps the
ranks' average. How fast gossip drives the ranks to that average is the mixing rate
``rho = ||W - 11^T/n||_2``: the consensus distance shrinks by at least ``rho^2`` per
round. The spectral gap is ``1 - rho``.

Each topology is defined once, by :meth:`Topology.peers` (what one rank sends and
receives); :meth:`Topology.mixing_matrix` assembles ``W`` from the peers of every rank,
so the matrix the tests check is the one the exchange follows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from largebatch.utils.errors import ConfigError, UnknownNameError, unknown_name_message


@dataclass(frozen=True)
class Peers:
    """Rank ``i``'s part in one gossip round.

    Attributes:
        self_weight: ``w_ii``.
        sources: ``(j, w_ij)`` for every other rank whose tensor ``i`` receives, in the
            order their contributions are added (fixed, so results are reproducible).
        destinations: the ranks that receive ``i``'s tensor (those with ``w_ji > 0``).
    """

    self_weight: float
    sources: tuple[tuple[int, float], ...]
    destinations: tuple[int, ...]


class Topology(ABC):
    """The communication graph of ``world_size`` ranks; ``ConfigError`` for a size it cannot use.

    ``period`` is the number of steps after which the graph repeats (1 for a static
    graph); ``all_reduce`` marks the complete graph, whose average one ``all_reduce``
    computes exactly rather than ``n - 1`` exchanges.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    all_reduce: ClassVar[bool] = False

    def __init__(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
            raise ConfigError(
                f"Invalid world size for topology {self.name!r}: {world_size!r} "
                "(decentralized training needs at least 2 processes)"
            )
        self.world_size = world_size

    @property
    def period(self) -> int:
        return 1

    @abstractmethod
    def peers(self, rank: int, step: int = 0) -> Peers:
        """What ``rank`` sends and receives at ``step``."""

    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        """``W`` at ``step`` (float64, ``n x n``), assembled from every rank's :meth:`peers`."""
        n = self.world_size
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for rank in range(n):
            peers = self.peers(rank, step)
            matrix[rank, rank] = peers.self_weight
            for source, weight in peers.sources:
                matrix[rank, source] = weight
        return matrix

    def mixing_rate(self) -> float:
        """``rho``: the factor by which gossip shrinks the distance to the average, per step.

        For a static graph ``||W - J||_2`` (``J = 11^T/n``); for a time-varying one the
        per-step rate over a period, ``||W_{p-1} ... W_0 - J||_2^{1/p}`` (0 for the
        one-peer exponential graph, whose ``p`` rounds average exactly).
        """
        n = self.world_size
        product = torch.eye(n, dtype=torch.float64)
        for step in range(self.period):
            product = self.mixing_matrix(step) @ product
        deviation = product - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        rate = torch.linalg.matrix_norm(deviation, ord=2).item() ** (1.0 / self.period)
        return 0.0 if rate < 1e-12 else rate

    def spectral_gap(self) -> float:
        """``1 - rho``."""
        return 1.0 - self.mixing_rate()

    def heavy_ball_rate(self, beta: float) -> float:
        """Per-step factor by which gossip with heavy-ball momentum ``beta``,
        ``x^{k+1} = W_k x^k + beta (x^k - x^{k-1})`` (DecentLaM's form), moves the ranks
        apart (> 1: unstable whatever the learning rate) or together (< 1).

        The spectral radius, on the ranks' disagreement, of the product of the companion
        matrices ``[[W_k + beta I, -beta I], [I, 0]]`` over one period, to the power
        ``1/period``. For a symmetric ``W`` (real eigenvalues) it is below 1 for every
        ``beta`` in ``[0, 1)``; the directed exponential graphs' complex eigenvalues are not.
        """
        n = self.world_size
        eye = torch.eye(n, dtype=torch.float64)
        product = torch.eye(2 * n, dtype=torch.float64)
        for step in range(self.period):
            top = torch.cat([self.mixing_matrix(step) + beta * eye, -beta * eye], 1)
            companion = torch.cat([top, torch.cat([eye, torch.zeros_like(eye)], 1)])
            product = companion @ product
        centre = eye - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        disagreement = torch.block_diag(centre, centre)
        radius = torch.linalg.eigvals(disagreement @ product @ disagreement).abs().max().item()
        return radius ** (1.0 / self.period)

    def largest_stable_momentum(self, tolerance: float = 1e-3) -> float:
        """The largest momentum whose :meth:`heavy_ball_rate` is below 1, to ``tolerance``
        (bisection: the rate grows with the momentum)."""
        stable, unstable = 0.0, 1.0
        while unstable - stable > tolerance:
            middle = (stable + unstable) / 2
            if self.heavy_ball_rate(middle) < 1.0:
                stable = middle
            else:
                unstable = middle
        return stable

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size})"


def _uniform(rank: int, sources: list[int], destinations: list[int]) -> Peers:
    """Equal weights for ``rank`` and each of its sources."""
    weight = 1.0 / (len(sources) + 1)
    return Peers(weight, tuple((j, weight) for j in sources), tuple(destinations))


class Ring(Topology):
    name = "ring"
    description = "each rank averages with its two neighbours, weights 1/3 (1/2 with 2 ranks)"

    def peers(self, rank: int, step: int = 0) -> Peers:
        n = self.world_size
        neighbours = sorted({(rank - 1) % n, (rank + 1) % n})
        return _uniform(rank, neighbours, neighbours)


class Exponential(Topology):
    name = "exp"
    description = (
        "static exponential graph: rank i receives from i - 2^k for k < ceil(log2 n), equal weights"
    )

    def peers(self, rank: int, step: int = 0) -> Peers:
        n = self.world_size
        offsets = [2**k for k in range(math.ceil(math.log2(n)))]
        return _uniform(rank, [(rank - o) % n for o in offsets], [(rank + o) % n for o in offsets])


class OnePeerExponential(Topology):
    name = "one-peer-exp"
    description = (
        "time-varying: at step k rank i averages 1/2-1/2 with i - 2^(k mod log2 n); "
        "exact average every log2 n steps (n a power of two)"
    )

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size)
        if world_size & (world_size - 1):
            raise ConfigError(
                f"Invalid world size for topology {self.name!r}: {world_size} "
                "(it needs a power of two: 2, 4, 8, ...)"
            )

    @property
    def period(self) -> int:
        return self.world_size.bit_length() - 1

    def peers(self, rank: int, step: int = 0) -> Peers:
        n = self.world_size
        offset = 2 ** (step % self.period)
        return _uniform(rank, [(rank - offset) % n], [(rank + offset) % n])


class Complete(Topology):
    name = "complete"
    description = "every rank averages with all others (W = 11^T/n): one all-reduce, as PmSGD"
    all_reduce = True

    def peers(self, rank: int, step: int = 0) -> Peers:
        others = [j for j in range(self.world_size) if j != rank]
        return _uniform(rank, others, others)


TOPOLOGIES: dict[str, type[Topology]] = {
    cls.name: cls for cls in (Ring, Exponential, OnePeerExponential, Complete)
}


def make_topology(name: str, world_size: int) -> Topology:
    """The topology ``name`` on ``world_size`` ranks.

    ``UnknownNameError`` for an unknown name; ``ConfigError`` naming the world size
    if it is below 2 or, for ``one-peer-exp``, not a power of two.
    """
    if not isinstance(name, str) or name not in TOPOLOGIES:
        raise UnknownNameError(unknown_name_message("topology", str(name), TOPOLOGIES))
    return TOPOLOGIES[name](world_size)
