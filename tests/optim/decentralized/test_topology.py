"""Topologies: mixing matrices against independent constructions and known spectra; bad sizes.

The references are built here from the definitions (circulant shifts), not from the
topologies' ``peers``; the spectra are the closed forms of the research notes
(``shared/research/decentralized.md`` §5).
"""

from __future__ import annotations

import math

import pytest
import torch

from largebatch.optim.decentralized import TOPOLOGIES, make_topology
from largebatch.utils.errors import ConfigError, UnknownNameError

SIZES = {
    "ring": range(2, 17),
    "exp": range(2, 17),
    "complete": range(2, 9),
    "one-peer-exp": (2, 4, 8, 16),
}


def receive_from(n: int, offsets: list[int]) -> torch.Tensor:
    """Equal weights on self and on ranks ``i - offset`` (offsets distinct mod n)."""
    matrix = torch.eye(n, dtype=torch.float64)
    for offset in offsets:
        matrix += torch.roll(torch.eye(n, dtype=torch.float64), -offset, dims=0).T
    return matrix / (len(offsets) + 1)


def test_the_reference_construction_receives_from_i_minus_offset():
    """Negative control for the helper itself: row i's weight sits at column i - 1."""
    matrix = receive_from(5, [1])
    assert matrix[3, 2] == 0.5 and matrix[3, 4] == 0


@pytest.mark.parametrize(("name", "n"), [(name, n) for name, sizes in SIZES.items() for n in sizes])
def test_mixing_matrices_are_doubly_stochastic_and_sends_match_receives(name, n):
    topology = make_topology(name, n)
    for step in range(topology.period):
        matrix = topology.mixing_matrix(step)
        assert (matrix >= 0).all()
        ones = torch.ones(n, dtype=torch.float64)
        torch.testing.assert_close(matrix @ ones, ones, rtol=0, atol=1e-15)
        torch.testing.assert_close(matrix.T @ ones, ones, rtol=0, atol=1e-15)
        for rank in range(n):  # rank sends to j exactly when j weighs rank's tensor
            receivers = {j for j in range(n) if j != rank and matrix[j, rank] > 0}
            assert set(topology.peers(rank, step).destinations) == receivers


@pytest.mark.parametrize("n", range(3, 17))
def test_ring_and_exponential_equal_their_circulant_definitions(n):
    torch.testing.assert_close(
        make_topology("ring", n).mixing_matrix(), receive_from(n, [1, n - 1])
    )
    offsets = [2**k for k in range(math.ceil(math.log2(n)))]
    torch.testing.assert_close(make_topology("exp", n).mixing_matrix(), receive_from(n, offsets))


@pytest.mark.parametrize(("n", "rho"), [(8, 0.805), (16, 0.949), (64, 0.997)])
def test_ring_mixing_rate_is_one_third_plus_two_thirds_cos(n, rho):
    rate = make_topology("ring", n).mixing_rate()
    assert rate == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n), abs=1e-12)
    assert rate == pytest.approx(rho, abs=5e-4)  # the notes' table
    assert make_topology("ring", n).spectral_gap() == pytest.approx(1 - rate)


@pytest.mark.parametrize(("n", "rho"), [(4, 1 / 3), (8, 0.5), (16, 0.6), (32, 2 / 3), (64, 0.714)])
def test_exponential_mixing_rate_is_one_minus_two_over_tau_plus_one(n, rho):
    tau = int(math.log2(n))
    rate = make_topology("exp", n).mixing_rate()
    assert rate == pytest.approx(1 - 2 / (tau + 1), abs=1e-12)
    assert rate == pytest.approx(rho, abs=5e-4)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_rounds_average_exactly_after_log2_n_steps(n):
    """Each round halves with one peer; log2 n consecutive rounds (from any start) give 11^T/n."""
    topology = make_topology("one-peer-exp", n)
    tau = int(math.log2(n))
    assert topology.period == tau
    average = torch.full((n, n), 1 / n, dtype=torch.float64)
    for start in range(tau):
        product = torch.eye(n, dtype=torch.float64)
        for step in range(start, start + tau):
            matrix = topology.mixing_matrix(step)
            torch.testing.assert_close(matrix, receive_from(n, [2 ** (step % tau)]))
            product = matrix @ product
        torch.testing.assert_close(product, average, rtol=0, atol=1e-15)
    assert topology.mixing_rate() == 0.0 and topology.spectral_gap() == 1.0
    if n > 2:  # a single round does not average: the product is what does it
        assert not torch.allclose(topology.mixing_matrix(0), average)


def test_complete_graph_is_the_average():
    topology = make_topology("complete", 5)
    torch.testing.assert_close(
        topology.mixing_matrix(), torch.full((5, 5), 0.2, dtype=torch.float64)
    )
    assert topology.all_reduce and topology.mixing_rate() == 0.0


@pytest.mark.parametrize("name", ["ring", "exp"])
def test_gossip_shrinks_the_consensus_distance_by_rho_squared_per_round(name):
    """Pure gossip x <- W x from heterogeneous values: the mean is kept and the distance to
    it falls at least as rho^(2k) (and, W being normal, as fast as that asymptotically)."""
    n = 16
    topology = make_topology(name, n)
    matrix, rho = topology.mixing_matrix(), topology.mixing_rate()
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x += 5.0 - x.mean(0)  # a mean far from 0, which gossip must keep
    mean = x.mean(0)

    def distance(x):
        return (x - mean).square().sum(1).mean().item()

    distances = [distance(x)]
    for k in range(1, 31):
        x = matrix @ x
        torch.testing.assert_close(x.mean(0), mean)
        distances.append(distance(x))
        assert distances[k] <= rho ** (2 * k) * distances[0] * (1 + 1e-9)
    assert distances[-1] / distances[-2] == pytest.approx(rho**2, rel=5e-3)


@pytest.mark.parametrize("size", [1, 0, -4, True, 2.0])
def test_a_world_of_fewer_than_two_processes_is_refused_naming_it(size):
    for name in TOPOLOGIES:
        with pytest.raises(
            ConfigError, match=rf"Invalid world size for topology '{name}': {size!r}"
        ):
            make_topology(name, size)


@pytest.mark.parametrize("size", [3, 6, 12])
def test_the_one_peer_graph_needs_a_power_of_two(size):
    with pytest.raises(ConfigError, match=rf"'one-peer-exp': {size} \(it needs a power of two"):
        make_topology("one-peer-exp", size)
    make_topology("exp", size)  # the static graph takes any size


def test_an_unknown_topology_is_named_with_the_closest_one():
    with pytest.raises(UnknownNameError, match="Unknown topology 'expo'. Did you mean 'exp'"):
        make_topology("expo", 4)
