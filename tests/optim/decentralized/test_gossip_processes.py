"""Gossip and the decentralized optimizers in four gloo processes (started once for the module).

Each process plays one rank of :mod:`quadratics`' heterogeneous problem and saves what
it saw; the tests compare that with the mixing matrices, with one-process simulations of
the same algorithms (``simulate``, checked against the update rules in
``test_algorithms.py``), with all-reduce momentum SGD and with the fixed points the
theory predicts.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from quadratics import BETA, DECAY, LR, Quadratics, phases, simulate

from largebatch.optim.decentralized import (
    TOPOLOGIES,
    DecentLaM,
    DmSGD,
    Gossip,
    SlowMo,
    make_topology,
)
from largebatch.optim.decentralized.topology import Peers, Topology
from largebatch.train.decentralized import DecentralizedRun
from largebatch.train.distributed import Distributed

N = 4
#: (optimizer, variant, topology, steps): runs recorded step by step
RUNS = [
    ("dmsgd", "atc", "ring", 130),
    ("decentlam", None, "ring", 130),
    ("dmsgd", "da", "exp", 20),
    ("dmsgd", "qg", "one-peer-exp", 20),
    ("decentlam", None, "one-peer-exp", 20),
    ("dmsgd", "atc", "complete", 20),
]
#: (topology, slow_every, slow_momentum, slow_lr): SlowMo over DmSGD (atc), 12 steps
SLOWMO_RUNS = [("ring", 4, 0.5, 0.7), ("complete", 3, 0.0, 1.0)]
SLOWMO_STEPS = 12
#: the runs long enough to converge (> 100 steps) take these settings, without weight decay
FIXED_POINT = dict(lr=0.05, beta=0.7, decay=0.0)
#: DmSGD from starts that differ per rank: a small rate, so the gossip sets the early decay
TRANSIENT = dict(lr=1e-3, momentum=BETA, weight_decay=0.0)
TRANSIENT_STEPS = 12
#: the graphs whose transient is recorded; (lazy, rho) is :class:`LazyComplete`
TRANSIENT_GRAPHS = ["ring", "exp", "one-peer-exp", "complete", ("lazy", 0.8), ("lazy", 1.0)]


class LazyComplete(Topology):
    """Test-only graph ``W = rho I + (1 - rho) 11^T/n``: every non-unit eigenvalue is ``rho``,
    so it mixes as slowly as asked (``rho = 1``: no mixing at all, ``W = I``)."""

    name = "lazy-complete"
    description = "keeps rho of its own value, spreads the rest equally"

    def __init__(self, world_size: int, rho: float) -> None:
        super().__init__(world_size)
        self.rho = rho

    def peers(self, rank: int, step: int = 0) -> Peers:
        share = (1 - self.rho) / self.world_size
        others = tuple(j for j in range(self.world_size) if j != rank)
        return Peers(self.rho + share, tuple((j, share) for j in others), others)


def graph(name, world_size: int = N) -> Topology:
    """A registry topology by name, or ``LazyComplete`` for ``("lazy", rho)``."""
    return (
        LazyComplete(world_size, name[1])
        if isinstance(name, tuple)
        else make_topology(name, world_size)
    )


def settings(steps: int) -> dict[str, float]:
    return FIXED_POINT if steps > 100 else dict(lr=LR, beta=BETA, decay=DECAY)


def _run_optimizer(problem, rank, optimizer_name, variant, topology, steps):
    """This rank's iterate after each of ``steps`` exact-gradient steps from 0."""
    x = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    run = settings(steps)
    hyper = dict(lr=run["lr"], momentum=run["beta"], weight_decay=run["decay"], topology=topology)
    if optimizer_name == "dmsgd":
        optimizer = DmSGD([x], variant=variant, **hyper)
    else:
        optimizer = DecentLaM([x], **hyper)
    trajectory = []
    for _ in range(steps):
        x.grad = problem.hessians[rank] @ x.detach() - problem.linear[rank]
        optimizer.step()
        trajectory.append(x.detach().clone())
    return torch.stack(trajectory), optimizer


def _run_slowmo(problem, rank, topology, every, beta, alpha):
    """This rank's iterate after each step of SlowMo over DmSGD, and the bytes it sent; then
    the same run again, saved after 6 steps and continued from a reloaded copy."""

    def run(x, optimizer, steps):
        trajectory = []
        for _ in range(steps):
            x.grad = problem.hessians[rank] @ x.detach() - problem.linear[rank]
            optimizer.step()
            trajectory.append(x.detach().clone())
        return trajectory

    def build(x):
        base = DmSGD([x], lr=LR, momentum=BETA, weight_decay=DECAY, topology=topology)
        return SlowMo(base, slow_every=every, slow_momentum=beta, slow_lr=alpha)

    x = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    optimizer = build(x)
    trajectory = run(x, optimizer, SLOWMO_STEPS)
    traffic = optimizer.gossip
    y = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    first = build(y)
    run(y, first, 6)
    z = y.detach().clone().requires_grad_()
    resumed = build(z)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    continued = run(z, resumed, SLOWMO_STEPS - 6)
    return {
        "trajectory": torch.stack(trajectory),
        "bytes": traffic.bytes_sent,
        "rounds": traffic.rounds,
        "resumed": torch.equal(torch.stack(continued), torch.stack(trajectory[6:])),
    }


def _all_reduce_sgd(problem, rank, steps):
    """Parallel momentum SGD: torch.optim.SGD on the all-reduced (mean) gradient."""
    x = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([x], lr=LR, momentum=BETA, weight_decay=DECAY)
    trajectory = []
    for _ in range(steps):
        grad = problem.hessians[rank] @ x.detach() - problem.linear[rank]
        dist.all_reduce(grad)
        x.grad = grad / N
        sgd.step()
        trajectory.append(x.detach().clone())
    return torch.stack(trajectory)


def _consensus_transient(problem, rank, topology):
    """The consensus distance as the training loop measures it (``DecentralizedRun``), from
    a start that differs per rank and after each of ``TRANSIENT_STEPS`` DmSGD steps on this
    rank's share of the heterogeneous problem."""
    generator = torch.Generator().manual_seed(100 + rank)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(
        100 * torch.randn(problem.d, generator=generator, dtype=torch.float64)
    )
    optimizer = DmSGD(model.parameters(), topology=topology, **TRANSIENT)
    run = DecentralizedRun(
        True, optimizer, model, Distributed(True, rank, N, torch.device("cpu"), False)
    )
    distances = []
    for step in range(TRANSIENT_STEPS + 1):
        with run.averaged():
            distances.append(run.result()["consensus_distance"])
        if step < TRANSIENT_STEPS:
            model.x.grad = problem.hessians[rank] @ model.x.detach() - problem.linear[rank]
            optimizer.step()
    return torch.tensor(distances, dtype=torch.float64)


def _resumed_matches(problem, rank):
    """DecentLaM on the one-peer graph: 6 steps, state_dict, 4 more; against a copy that
    reloads the state, and one that does not (its round count starts over)."""

    def steps(x, optimizer, count):
        for _ in range(count):
            x.grad = problem.hessians[rank] @ x.detach() - problem.linear[rank]
            optimizer.step()

    x = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    optimizer = DecentLaM([x], lr=LR, topology="one-peer-exp")
    steps(x, optimizer, 6)
    saved_x, saved_state = x.detach().clone(), copy.deepcopy(optimizer.state_dict())
    steps(x, optimizer, 4)
    outcomes = []
    for load in (True, False):
        y = saved_x.clone().requires_grad_()
        resumed = DecentLaM([y], lr=LR, topology="one-peer-exp")
        if load:
            resumed.load_state_dict(saved_state)
        steps(y, resumed, 4)
        outcomes.append(torch.equal(y, x))
    return outcomes


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N)
    try:
        problem = Quadratics.make(N)
        record = {"rows": {}, "bytes": {}, "decay": {}, "runs": {}}
        for name in TOPOLOGIES:
            gossip = Gossip(name)
            for step in range(2):
                one_hot = torch.zeros(N, dtype=torch.float64)
                one_hot[rank] = 1.0
                single = torch.arange(3, dtype=torch.float32) + 10 * rank  # a second dtype
                gossip.mix_([one_hot, single], step)
                record["rows"][name, step] = (one_hot, single)
            record["bytes"][name] = gossip.bytes_sent / gossip.rounds
            x = torch.randn(5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
            trajectory = [x.clone()]
            for step in range(6):
                gossip.mix_([x], step)
                trajectory.append(x.clone())
            record["decay"][name] = torch.stack(trajectory)
        for optimizer, variant, topology, steps in RUNS:
            trajectory, built = _run_optimizer(problem, rank, optimizer, variant, topology, steps)
            record["runs"][optimizer, variant, topology] = trajectory
            record["runs"][optimizer, variant, topology, "bytes"] = built.gossip.bytes_sent
        record["all-reduce"] = _all_reduce_sgd(problem, rank, 20)
        record["transient"] = {
            name: _consensus_transient(problem, rank, graph(name)) for name in TRANSIENT_GRAPHS
        }
        record["slowmo"] = {run: _run_slowmo(problem, rank, *run) for run in SLOWMO_RUNS}
        record["resumed"] = _resumed_matches(problem, rank)
        try:
            Gossip(make_topology("ring", 8))
        except ValueError as error:
            record["mismatch"] = str(error)
        torch.save(record, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gossip")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, out), nprocs=N, start_method="fork")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(N)]


def _stacked(ranks, key) -> torch.Tensor:
    """(steps, n, d): every rank's recorded trajectory of run ``key``."""
    return torch.stack([r["runs"][key] for r in ranks], dim=1)


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_each_rank_receives_exactly_its_row_of_w(ranks, name):
    """Mixing one-hot vectors e_j gives sum_j w_ij e_j: row i of W, in both dtypes' buckets."""
    topology = make_topology(name, N)
    for step in range(2):
        matrix = topology.mixing_matrix(step)
        values = (
            torch.arange(3, dtype=torch.float32)
            + 10 * torch.arange(N, dtype=torch.float32)[:, None]
        )
        for rank, record in enumerate(ranks):
            one_hot, single = record["rows"][name, step]
            torch.testing.assert_close(one_hot, matrix[rank], rtol=0, atol=1e-15)
            torch.testing.assert_close(
                single, (matrix[rank].float() @ values), rtol=1e-6, atol=1e-5
            )


@pytest.mark.parametrize(
    ("name", "sends"), [("ring", 2), ("exp", 2), ("one-peer-exp", 1), ("complete", 2 * (N - 1) / N)]
)
def test_bytes_per_round_are_the_buffers_sent(ranks, name, sends):
    """Per round: 4 float64 + 3 float32 = 44 bytes to each destination (the all-reduce:
    the ring algorithm's nominal 2 (n-1)/n buffers)."""
    assert all(r["bytes"][name] == pytest.approx(sends * 44, abs=1) for r in ranks)


def test_consensus_distance_shrinks_as_the_spectral_gap_says(ranks):
    """n = 4: every non-unit eigenvalue of the ring's and of the exponential graph's W has
    modulus rho = 1/3, so the distance falls by exactly rho^2 = 1/9 per round; the one-peer
    graph averages exactly in log2 4 = 2 rounds, the complete graph in one."""
    for name in TOPOLOGIES:
        x = torch.stack([r["decay"][name] for r in ranks], dim=1)  # (rounds, n, d)
        mean = x[0].mean(0)
        torch.testing.assert_close(x.mean(1), mean.expand(7, -1), rtol=0, atol=1e-14)
        distance = (x - mean).square().sum(2).mean(1)
        rho = make_topology(name, N).mixing_rate()
        if name in ("ring", "exp"):
            assert rho == pytest.approx(1 / 3)
            expected = distance[0] * torch.tensor(
                [rho ** (2 * k) for k in range(7)], dtype=torch.float64
            )
            torch.testing.assert_close(distance, expected, rtol=1e-9, atol=0)
        else:
            rounds = 1 if name == "complete" else 2
            assert (distance[rounds:] < 1e-28 * distance[0]).all() and distance[rounds - 1] > 0.01


@pytest.mark.parametrize(("name", "fitted"), [("ring", 4), ("exp", 4), (("lazy", 0.8), 10)])
def test_in_training_the_consensus_distance_decays_by_rho_squared_per_step(ranks, name, fitted):
    """DmSGD on the heterogeneous problem from starts 100 apart: over the early transient the
    distance (the loop's measurement) falls by rho^2 of W per step, within 5%. The gradient
    steps perturb that: each moves the ranks apart by up to lr L / (1 - beta) = 3% of their
    distance (L = 3.2, the largest curvature), and the momentum's memory of the start and
    the uneven data leave a floor (0.02 on the ring), so the rate is fitted over the first
    steps only, while the distance is over 100 times that floor. At n = 4 the ring and the
    exponential graph share rho = 1/3; the lazy complete graph (rho = 0.8) mixes slower, and
    its rate is far from theirs (the comparison can fail)."""
    distance = ranks[0]["transient"][name]
    assert all(torch.equal(r["transient"][name], distance) for r in ranks)  # one all-reduce
    rho = graph(name).mixing_rate()
    assert rho == pytest.approx(0.8 if isinstance(name, tuple) else 1 / 3)
    rate = (distance[fitted] / distance[0]).item() ** (1 / fitted)
    assert rate == pytest.approx(rho**2, rel=0.05)
    assert distance[fitted] > 100 * ranks[0]["transient"]["ring"][-1]
    other = 1 / 9 if isinstance(name, tuple) else 0.64
    assert abs(rate - other) > 0.5 * other


def test_in_training_a_slower_mixing_graph_keeps_the_ranks_apart_longer(ranks):
    """Same runs: one all-reduce (the complete graph, rho = 0) makes the ranks equal at once;
    the one-peer graph's first round halves the distance at most (its W_0 has rho 1/sqrt 2) and
    its second averages exactly, leaving only the gradient steps' disagreement; the ring (1/3)
    and the lazy graph (0.8) follow, in that order, at every step. Without gossip (W = I,
    the negative control) the same steps leave them over half as far apart as they began."""
    got = ranks[0]["transient"]
    start = got["ring"][0]
    assert all(torch.equal(d[0], start) for d in got.values())  # the same starts
    assert (got["complete"][1:] == 0).all()
    one_peer = got["one-peer-exp"]
    assert one_peer[1] <= 0.5 * start and (one_peer[2:] < 1e-5 * start).all()
    steps = slice(1, TRANSIENT_STEPS + 1)
    assert (one_peer[2:5] < got["ring"][2:5]).all()
    assert (got["ring"][steps] < got["lazy", 0.8][steps]).all()
    assert (got["lazy", 0.8][steps] < got["lazy", 1.0][steps]).all()
    assert got["lazy", 1.0][TRANSIENT_STEPS] > 0.5 * start


@pytest.mark.parametrize(("optimizer", "variant", "topology", "steps"), RUNS)
def test_the_processes_follow_the_one_process_simulation_step_by_step(
    ranks, optimizer, variant, topology, steps
):
    """The optimizers, gossiping for real, equal their algorithm run on the stacked ranks
    (with the one-peer graph's W changing every step)."""
    problem = Quadratics.make(N)
    got = _stacked(ranks, (optimizer, variant, topology))[:40]
    matrices = [make_topology(topology, N).mixing_matrix(k) for k in range(len(got))]
    expected = simulate(variant or optimizer, problem, matrices, len(got), **settings(steps))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_the_double_averaging_variant_sends_twice_the_bytes(ranks):
    """Per step, a model of 4 float64 to each destination; DA sends its momentum as well."""
    for record in ranks:
        assert record["runs"]["dmsgd", "da", "exp", "bytes"] == 20 * 2 * (2 * 32)
        assert record["runs"]["dmsgd", "qg", "one-peer-exp", "bytes"] == 20 * 1 * 32


def test_complete_graph_dmsgd_is_all_reduce_momentum_sgd_step_by_step(ranks):
    """float64, 20 steps: equal up to rounding (the two sum in different orders); the ring's
    run, same settings, is far from it (the comparison can fail)."""
    pmsgd = torch.stack([r["all-reduce"] for r in ranks], dim=1)
    complete = _stacked(ranks, ("dmsgd", "atc", "complete"))
    torch.testing.assert_close(complete, pmsgd, rtol=1e-13, atol=1e-13)
    assert torch.equal(pmsgd[:, 0], pmsgd[:, 3])  # all-reduce keeps the ranks identical
    ring = _stacked(ranks, ("dmsgd", "da", "exp"))
    assert (ring - pmsgd).abs().max() > 1e-3


def test_on_uneven_data_dmsgd_keeps_its_bias_and_decentlam_ends_at_dsgds_point(ranks):
    """Four ranks, ring, exact local gradients (the large-batch limit): DmSGD(lr, beta) ends at
    DSGD's fixed point for lr / (1 - beta), DecentLaM at DSGD's for lr, far closer to the
    optimum (test_algorithms.py checks how the two biases scale)."""
    problem = Quadratics.make(N)
    mixing = make_topology("ring", N).mixing_matrix()
    lr, beta = FIXED_POINT["lr"], FIXED_POINT["beta"]
    dmsgd = _stacked(ranks, ("dmsgd", "atc", "ring"))
    decentlam = _stacked(ranks, ("decentlam", None, "ring"))
    big_step, small_step = (problem.dsgd_fixed_point(mixing, a) for a in (lr / (1 - beta), lr))
    torch.testing.assert_close(dmsgd[-1], big_step, rtol=0, atol=1e-9)
    torch.testing.assert_close(decentlam[-1], small_step, rtol=0, atol=1e-9)
    assert (big_step - small_step).abs().max() > 0.1  # the comparison can fail
    assert problem.bias(dmsgd[-1]) > 8 * problem.bias(decentlam[-1])


def test_a_saved_and_loaded_state_continues_bit_for_bit(ranks):
    """The round count travels in the state (the one-peer graph depends on it): without it
    the continuation differs."""
    assert [r["resumed"] for r in ranks] == [[True, False]] * N


def test_a_topology_for_another_world_size_is_refused_naming_it(ranks):
    assert (
        "Invalid topology: Ring(world_size=8) for a process group of 4 process(es)"
        in ranks[0]["mismatch"]
    )


def _simulate_slowmo(problem, mixing, steps, every, beta, alpha):
    """SlowMo on the stacked ranks, float64, from Wang et al.'s equations: DmSGD (its
    ``prepare``/``finish``, checked in test_algorithms.py) with ``W @`` as the gossip; every
    ``every`` steps the rows averaged (iterates and momentum), then u <- beta u + (x0 -
    xbar) / lr, x0 <- x0 - alpha lr u, and every row set to x0."""
    prepare, finish = phases("atc")
    x = torch.zeros(problem.n, problem.d, dtype=torch.float64)
    m, anchor, u = torch.zeros_like(x), torch.zeros(problem.d, dtype=torch.float64), 0.0
    settings = dict(lr=LR, momentum=BETA, weight_decay=DECAY, nesterov=False, foreach=None)
    trajectory = []
    for step in range(steps):
        outgoing = prepare([x], [problem.gradients(x)], [m], **settings)
        outgoing[0].copy_(mixing @ outgoing[0])
        finish([x], None, [m], outgoing, **settings)
        if (step + 1) % every == 0:
            m[:] = m.mean(0)
            u = beta * u + (anchor - x.mean(0)) / LR
            anchor = anchor - alpha * LR * u
            x[:] = anchor
        trajectory.append(x.clone())
    return torch.stack(trajectory)


def test_slowmo_follows_the_papers_equations_on_four_ranks(ranks):
    """Ring, tau = 4, beta = 0.5, alpha = 0.7: every rank's iterate equals the float64
    re-derivation step by step, the ranks agree after each exact average and differ between
    (the comparison can fail), and a state saved mid-round continues bit for bit."""
    problem = Quadratics.make(N)
    run = ("ring", 4, 0.5, 0.7)
    got = torch.stack([r["slowmo"][run]["trajectory"] for r in ranks], dim=1)
    expected = _simulate_slowmo(problem, make_topology("ring", N).mixing_matrix(), 12, *run[1:])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(got[k, 0], got[k, 3]) for k in (3, 7, 11))
    assert not torch.equal(got[5, 0], got[5, 3])
    assert all(r["slowmo"][run]["resumed"] for r in ranks)


def test_slowmo_without_slow_momentum_over_the_complete_graph_is_its_base(ranks):
    """beta = 0, alpha = 1 is an exact average every tau steps, which the complete graph's
    gossip already is: the run equals DmSGD's on the complete graph (itself PmSGD)."""
    got = torch.stack([r["slowmo"][("complete", 3, 0.0, 1.0)]["trajectory"] for r in ranks], 1)
    base = _stacked(ranks, ("dmsgd", "atc", "complete"))[:SLOWMO_STEPS]
    torch.testing.assert_close(got, base, rtol=1e-13, atol=1e-13)


def test_slowmo_counts_the_gossip_and_the_exact_averages(ranks):
    """Per step 2 neighbours x 4 float64 (ring); at steps 4, 8 and 12 one all-reduce of the
    iterate and the momentum (8 float64: the nominal 2 (n-1)/n of 64 bytes, 96)."""
    for record in ranks:
        run = record["slowmo"][("ring", 4, 0.5, 0.7)]
        assert run["rounds"] == 12
        assert run["bytes"] == 12 * 2 * 32 + 3 * 96
