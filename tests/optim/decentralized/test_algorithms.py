"""The update rules of DmSGD (four variants) and DecentLaM, and the bias theory, in one process.

n ranks are simulated by stacking their iterates as the rows of one tensor: every
operation of an algorithm's ``prepare``/``finish`` is elementwise, and the gossip is
``W @`` the stacked tensors. The references are float64 matrix recursions written here
from the update rules (for DecentLaM in its heavy-ball form, a different formula from the
implementation's); the theory is the fixed-point analysis of the research notes (§3):
DmSGD(lr, beta) ends at DSGD's fixed point for step lr / (1 - beta), DecentLaM(lr, beta) at
DSGD's for step lr. The same algorithms in four gloo processes: ``test_gossip_processes.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from quadratics import BETA, DECAY, LR, Quadratics, simulate

from largebatch.optim.decentralized import DecentLaM, decentlam, dmsgd, make_topology


def reference(algorithm, problem, mixing, steps, *, nesterov=False):
    """The same iterates from the update rules as matrix recursions (X: n x d)."""
    x, m, previous = (torch.zeros(problem.n, problem.d, dtype=torch.float64) for _ in range(3))
    trajectory = []
    for _ in range(steps):
        g = problem.gradients(x) + DECAY * x
        if algorithm == "decentlam" and not nesterov:  # heavy-ball form
            x, previous = mixing @ (x - LR * g) + BETA * (x - previous), x
        elif algorithm == "decentlam":
            corrected = (x - mixing @ (x - LR * g)) / LR
            m = BETA * m + corrected
            x = x - LR * (corrected + BETA * m if nesterov else m)
        elif algorithm == "qg":
            u = BETA * m + g
            moved = mixing @ (x - LR * (g + BETA * u if nesterov else u))
            m = BETA * m + (1 - BETA) * (x - moved) / LR
            x = moved
        else:
            m = BETA * (mixing @ m if algorithm == "da" else m) + g
            direction = g + BETA * m if nesterov else m
            x = mixing @ (x - LR * direction) if algorithm == "atc" else mixing @ x - LR * direction
        trajectory.append(x)
    return trajectory


ALGORITHMS = ["atc", "awc", "da", "qg", "decentlam"]


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_update_rule_follows_its_matrix_recursion(algorithm, nesterov):
    """Exponential graph on 8 ranks: W is not symmetric, so sending and receiving are told apart."""
    problem = Quadratics.make(8)
    mixing = make_topology("exp", 8).mixing_matrix()
    got = simulate(algorithm, problem, mixing, 30, nesterov=nesterov)
    expected = reference(algorithm, problem, mixing, 30, nesterov=nesterov)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"step {step}")
    # negative control: the transposed matrix (receive where one should send) is far off
    transposed = reference(algorithm, problem, mixing.T, 30, nesterov=nesterov)
    assert (got[-1] - transposed[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_functional_forms_take_any_mix_function(algorithm):
    """``dmsgd(..., mix=)`` / ``decentlam(..., mix=)`` with the stacked ranks' W."""
    problem = Quadratics.make(4)
    mixing = make_topology("exp", 4).mixing_matrix()
    x = torch.zeros(4, problem.d, dtype=torch.float64)
    m = torch.zeros_like(x)

    def mix(tensors):
        for tensor in tensors:
            tensor.copy_(mixing @ tensor)

    settings = dict(lr=LR, momentum=BETA, weight_decay=DECAY, mix=mix)
    for _ in range(10):
        grad = problem.gradients(x)
        if algorithm == "decentlam":
            decentlam([x], [grad], [m], **settings)
        else:
            dmsgd([x], [grad], [m], variant=algorithm, **settings)
    expected = simulate(algorithm, problem, mixing, 10)[-1]
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_single_tensor_and_multi_tensor_paths_agree(algorithm):
    problem = Quadratics.make(4)
    mixing = make_topology("ring", 4).mixing_matrix()
    runs = [simulate(algorithm, problem, mixing, 10, foreach=f, split=True) for f in (False, True)]
    torch.testing.assert_close(runs[0][-1], runs[1][-1], rtol=1e-14, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_on_cuda_the_update_rules_match_the_cpu(algorithm, nesterov):
    """CUDA tensors take torch.optim.SGD's multi-tensor path by default, the CPU's the
    single-tensor one: both equal the matrix recursion."""
    problem = Quadratics.make(8)
    mixing = make_topology("exp", 8).mixing_matrix()
    on_cuda = Quadratics(problem.hessians.cuda(), problem.linear.cuda())
    got = simulate(algorithm, on_cuda, mixing.cuda(), 30, nesterov=nesterov, split=True)
    expected = reference(algorithm, problem, mixing, 30, nesterov=nesterov)
    torch.testing.assert_close(got[-1].cpu(), expected[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["atc", "decentlam"])
def test_with_the_complete_graph_they_are_parallel_momentum_sgd(algorithm):
    """W = 11^T/n from identical starts: torch.optim.SGD on the ranks' mean gradient."""
    problem = Quadratics.make(4)
    got = simulate(algorithm, problem, make_topology("complete", 4).mixing_matrix(), 25)
    x = torch.zeros(problem.d, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([x], lr=LR, momentum=BETA, weight_decay=DECAY)
    for step in range(25):
        x.grad = problem.gradients(x.detach().expand(problem.n, -1)).mean(0)
        sgd.step()
        torch.testing.assert_close(got[step], x.detach().expand(4, -1), rtol=1e-13, atol=1e-13)


def limit(algorithm, problem, mixing, lr):
    """The iterates after enough deterministic steps to have converged (checked)."""
    trajectory = simulate(algorithm, problem, mixing, 3000, lr=lr, decay=0.0)
    assert (trajectory[-1] - trajectory[-2]).abs().max() < 1e-13, "not converged"
    return trajectory[-1]


def test_dmsgd_ends_at_dsgd_with_step_lr_over_one_minus_beta_and_decentlam_at_step_lr():
    """Heterogeneous data, exact gradients (the infinite-batch limit), ring of 8 (rho = 0.805)."""
    problem = Quadratics.make(8)
    mixing = make_topology("ring", 8).mixing_matrix()
    lr = 0.01
    dmsgd = limit("atc", problem, mixing, lr)
    decentlam = limit("decentlam", problem, mixing, lr)
    torch.testing.assert_close(
        dmsgd, problem.dsgd_fixed_point(mixing, lr / (1 - BETA)), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(decentlam, problem.dsgd_fixed_point(mixing, lr), rtol=0, atol=1e-10)
    # negative control: the two fixed points are far apart, so the comparison can fail
    assert (dmsgd - decentlam).abs().max() > 1e-2
    # all-reduce (W = 11^T/n) has no bias at all
    complete = limit("atc", problem, make_topology("complete", 8).mixing_matrix(), lr)
    torch.testing.assert_close(complete, problem.optimum().expand(8, -1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("topology", ["ring", "exp"])
def test_momentum_multiplies_the_inconsistency_bias_by_one_over_one_minus_beta_squared(topology):
    """At DSGD's fixed point for a small step a (checked above to be where the optimizers
    end: a = lr / (1 - beta) for DmSGD, a = lr for DecentLaM), the consensus error is, to
    first order, X - 1 x̄^T = -a (I - W)^+ W grad F(x°), hence at most
    a^2 rho^2 b^2 / (1 - rho)^2 with b^2 = (1/n) sum_i ||grad f_i(x°)||^2 (for a normal W):
    DmSGD's bias is (1 - beta)^-2 = 100 times DecentLaM's, which vanishes as lr^2."""
    problem = Quadratics.make(8)
    topology = make_topology(topology, 8)
    mixing, rho = topology.mixing_matrix(), topology.mixing_rate()
    at_optimum = problem.gradients(problem.optimum().expand(8, -1))
    heterogeneity = at_optimum.square().sum(1).mean().item()  # b^2
    first_order = (
        torch.linalg.pinv(torch.eye(8, dtype=torch.float64) - mixing) @ mixing @ at_optimum
    )

    def consensus(x):
        return (x - x.mean(0)).square().sum(1).mean().item()

    for lr in (1e-4, 1e-5):
        points = {
            "dmsgd": problem.dsgd_fixed_point(mixing, lr / (1 - BETA)),
            "decentlam": problem.dsgd_fixed_point(mixing, lr),
        }
        steps = {"dmsgd": lr / (1 - BETA), "decentlam": lr}
        for name, point in points.items():
            predicted = steps[name] ** 2 * first_order.square().sum(1).mean().item()
            assert consensus(point) == pytest.approx(predicted, rel=0.05), name
            assert consensus(point) <= steps[name] ** 2 * rho**2 / (1 - rho) ** 2 * heterogeneity
        ratio = problem.bias(points["dmsgd"]) / problem.bias(points["decentlam"])
        assert ratio == pytest.approx((1 - BETA) ** -2, rel=0.05)
    tenth = problem.bias(problem.dsgd_fixed_point(mixing, 1e-5))
    assert tenth / problem.bias(problem.dsgd_fixed_point(mixing, 1e-4)) == pytest.approx(
        0.01, rel=0.05
    )


def test_the_gap_appears_as_the_batch_grows():
    """Gradient noise ~ 1/sqrt(batch): at small batch noise dominates both methods' error
    and they are alike; at large batch DmSGD's bias dominates (the paper's claim)."""
    problem = Quadratics.make(8)
    mixing = make_topology("ring", 8).mixing_matrix()
    optimum = problem.optimum()

    def error(algorithm, noise):
        trajectory = simulate(algorithm, problem, mixing, 3000, lr=0.005, decay=0.0, noise=noise)
        return torch.stack([(x - optimum).square().sum(1).mean() for x in trajectory[1500:]]).mean()

    ratios = [error("atc", noise) / error("decentlam", noise) for noise in (30.0, 3.0, 0.01)]
    assert ratios[0] < 1.5 and ratios[0] < ratios[1] < ratios[2] and ratios[2] > 50


def consensus(x):
    return float((x - x.mean(0)).square().sum(1).mean())


@pytest.mark.parametrize(
    "name, algorithm, beta, rate",
    [("exp", "decentlam", 0.9, 1.1555), ("one-peer-exp", "decentlam", 0.9, 1.0795),
     ("ring", "decentlam", 0.9, None), ("exp", "decentlam", 0.5, None),
     ("one-peer-exp", "decentlam", 0.5, None), ("exp", "atc", 0.9, None)],
)  # fmt: skip
def test_decentlam_drifts_apart_on_the_directed_exponential_graphs(name, algorithm, beta, rate):
    """On the exponential graphs W is not symmetric: at n = 4 the static graph's eigenvalues
    ±i/3 make DecentLaM's heavy-ball recursion grow by 1.155 per step at beta = 0.9, the
    one-peer graph's rounds (eigenvalues (1 ± i)/2, then 0 and 1) by 1.08, whatever the
    learning rate, so gradient noise drives the ranks apart (the decentralized study's
    `decentlam-exp` runs diverge). The measured growth equals the prediction; the symmetric
    ring, a smaller beta and DmSGD (whose momentum stays out of the gossip) keep the ranks
    together (negative controls)."""
    zero = torch.zeros(4, 3, dtype=torch.float64)
    problem = Quadratics(torch.zeros(4, 3, 3, dtype=torch.float64), zero)  # noise only
    topology = make_topology(name, 4)
    mixing = [topology.mixing_matrix(k) for k in range(200)]
    xs = simulate(algorithm, problem, mixing, 200, beta=beta, decay=0.0, noise=1.0)
    if algorithm == "decentlam":
        assert (topology.heavy_ball_rate(beta) > 1) == (rate is not None)
    if rate is not None:
        assert topology.heavy_ball_rate(beta) == pytest.approx(rate, abs=1e-3)
        measured = (consensus(xs[199]) / consensus(xs[149])) ** (1 / 100)  # squared: 2 x 50
        assert measured == pytest.approx(rate, rel=0.01)
    else:
        assert max(consensus(x) for x in xs[100:]) < 1e-2


def test_with_more_ranks_even_half_the_momentum_is_unstable_on_the_exponential_graphs():
    """The largest stable beta falls with n: on the static graph beta = 0.5 is stable at
    n = 4 and 8 but not at 16; on the one-peer graph beta = 0.5 holds to n = 16, not 0.7."""
    rates = {(name, n, beta): make_topology(name, n).heavy_ball_rate(beta)
             for name in ("exp", "one-peer-exp") for n in (4, 8, 16) for beta in (0.5, 0.7)}  # fmt: skip
    assert rates["exp", 4, 0.5] == pytest.approx(0.906, abs=1e-3)
    assert rates["exp", 8, 0.5] == pytest.approx(0.986, abs=1e-3)
    assert rates["exp", 16, 0.5] > 1 and rates["exp", 4, 0.7] > 1
    assert all(rates["one-peer-exp", n, 0.5] < 1 for n in (4, 8, 16))
    assert rates["one-peer-exp", 4, 0.7] < 1 < rates["one-peer-exp", 16, 0.7]
    assert all(make_topology("ring", n).heavy_ball_rate(0.9) < 1 for n in (4, 8, 16, 64))


@pytest.mark.parametrize(
    "name, n, threshold",
    [("exp", 4, 0.64), ("exp", 8, 0.52), ("exp", 16, 0.50),
     ("one-peer-exp", 4, 0.77), ("one-peer-exp", 8, 0.71), ("one-peer-exp", 16, 0.56)],
)  # fmt: skip
def test_largest_stable_momentum_is_where_the_rate_crosses_one(name, n, threshold):
    """The thresholds docs/decentralized.md quotes, with the rate on either side of them."""
    topology = make_topology(name, n)
    stable = topology.largest_stable_momentum()
    assert stable == pytest.approx(threshold, abs=0.01)
    assert topology.heavy_ball_rate(stable) < 1 < topology.heavy_ball_rate(stable + 0.01)
    assert make_topology("ring", n).largest_stable_momentum() > 0.99


@pytest.mark.parametrize(
    "name, momentum, warns",
    [("exp", 0.9, True), ("one-peer-exp", 0.9, True), ("exp", 0.5, False), ("ring", 0.9, False)],
)
def test_decentlam_warns_on_an_unstable_pairing_of_graph_and_momentum(name, momentum, warns):
    """The pairings the drift test shows diverging get a warning that names the graph, the
    momentum, the growth factor and the largest stable momentum; stable ones get none."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DecentLaM(params, lr=0.1, momentum=momentum, topology=make_topology(name, 4))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        (message,) = messages
        assert f"momentum {momentum} on topology {name!r} with 4 processes" in message
        rate = make_topology(name, 4).heavy_ball_rate(momentum)
        assert f"grows by {rate:.3f} per step" in message and "below 0." in message
    else:
        assert messages == []
