"""Shampoo against float64 re-derivations of the paper's equations and against torch.optim."""

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch

from largebatch.optim import create_optimizer, get_spec
from largebatch.optim.shampoo import (
    AdamGraftingConfig,
    CoupledNewtonConfig,
    EighConfig,
    RMSpropGraftingConfig,
    RootComputationError,
    RootConfig,
    Shampoo,
)


def matrix_power(matrix: np.ndarray, exponent: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * values**exponent) @ vectors.T


def exact(params, **overrides) -> Shampoo:
    """Shampoo computing fresh float64 roots every step, from step 1, with no ridge."""
    settings = dict(
        lr=0.1,
        epsilon=1e-3,
        precondition_frequency=1,
        start_preconditioning_step=1,
        asynchronous=False,
        factor_dtype=torch.float64,
        roots=RootConfig(compute_dtype=torch.float64, relative_epsilon=0.0),
    )
    return Shampoo(params, **{**settings, **overrides})


def take_step(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor
) -> np.ndarray:
    """Apply ``grad`` and return the update ``p_new - p_old``."""
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()
    return (param.detach() - before).numpy()


# --- the preconditioned direction ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "rtol"),
    [(EighConfig(), 1e-10), (CoupledNewtonConfig(tolerance=1e-12), 1e-7)],
    ids=["eigh", "newton"],
)
def test_matrix_direction_is_left_and_right_inverse_fourth_roots(method, rtol):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    roots = RootConfig(method=method, compute_dtype=torch.float64, relative_epsilon=0.0)
    optimizer = exact([weight], betas=(0.0, 1.0), grafting="sgd", roots=roots)
    left, right = 1e-3 * np.eye(5), 1e-3 * np.eye(7)
    for _ in range(3):
        grad = torch.randn(5, 7, dtype=torch.float64)
        update = take_step(optimizer, weight, grad)
        g = grad.numpy()
        left, right = left + g @ g.T, right + g.T @ g
        direction = matrix_power(left, -0.25) @ g @ matrix_power(right, -0.25)
        # SGD grafting: the step has the gradient's norm and Shampoo's direction.
        expected = -0.1 * np.linalg.norm(g) / np.linalg.norm(direction) * direction
        np.testing.assert_allclose(update, expected, rtol=rtol, atol=rtol / 100)

        # The -1/k bug (exponent -1/2 for a matrix) gives a visibly different step.
        wrong = matrix_power(left, -0.5) @ g @ matrix_power(right, -0.5)
        wrong *= -0.1 * np.linalg.norm(g) / np.linalg.norm(wrong)
        assert np.abs(update - wrong).max() > 1e-3


def test_order_three_tensor_uses_exponent_minus_one_over_six():
    torch.manual_seed(1)
    shape = (3, 4, 5)
    weight = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    # Block size 5 keeps the three dims apart (3 * 4 > 5, 4 * 5 > 5) and unsplit.
    optimizer = exact([weight], betas=(0.0, 1.0), grafting="sgd", max_preconditioner_dim=5)
    stats = [1e-3 * np.eye(n) for n in shape]
    for _ in range(2):
        grad = torch.randn(shape, dtype=torch.float64)
        update = take_step(optimizer, weight, grad)
        g = grad.numpy()
        stats[0] += np.einsum("iab,jab->ij", g, g)
        stats[1] += np.einsum("aib,ajb->ij", g, g)
        stats[2] += np.einsum("abi,abj->ij", g, g)
        roots = [matrix_power(s, -1.0 / 6.0) for s in stats]
        direction = np.einsum("ia,jb,kc,abc->ijk", *roots, g)
        expected = -0.1 * np.linalg.norm(g) / np.linalg.norm(direction) * direction
        np.testing.assert_allclose(update, expected, rtol=1e-10, atol=1e-12)


def test_each_block_takes_the_grafted_adam_norm_and_its_own_shampoo_direction():
    torch.manual_seed(2)
    beta1, lr = 0.9, 0.05
    weight = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    reference = torch.nn.Parameter(weight.detach().clone())
    # Block size 4 cuts the 6 x 10 matrix into 2 x 3 blocks of four different shapes.
    optimizer = exact([weight], lr=lr, betas=(beta1, 1.0), max_preconditioner_dim=4)
    adam = torch.optim.Adam([reference], lr=lr, betas=(beta1, 0.999), eps=1e-8)
    rows, cols = [slice(0, 4), slice(4, 6)], [slice(0, 4), slice(4, 8), slice(8, 10)]
    blocks = [(r, c) for r in rows for c in cols]
    stats = [(1e-3 * np.eye(r.stop - r.start), 1e-3 * np.eye(c.stop - c.start)) for r, c in blocks]
    momentum = np.zeros((6, 10))
    for step in range(1, 4):
        grad = torch.randn(6, 10, dtype=torch.float64)
        update = take_step(optimizer, weight, grad)
        adam_update = take_step(adam, reference, grad)
        g = grad.numpy()
        momentum = beta1 * momentum + (1 - beta1) * g
        corrected = momentum / (1 - beta1**step)
        for index, (r, c) in enumerate(blocks):
            left, right = stats[index]
            left, right = left + g[r, c] @ g[r, c].T, right + g[r, c].T @ g[r, c]
            stats[index] = (left, right)
            direction = matrix_power(left, -0.25) @ corrected[r, c] @ matrix_power(right, -0.25)
            # Grafting: the block's step norm is Adam's step norm on that block.
            np.testing.assert_allclose(
                np.linalg.norm(update[r, c]), np.linalg.norm(adam_update[r, c]), rtol=1e-10
            )
            expected_direction = -direction / np.linalg.norm(direction)
            np.testing.assert_allclose(
                update[r, c] / np.linalg.norm(update[r, c]),
                expected_direction,
                rtol=1e-8,
                atol=1e-10,
            )


# --- grafted steps: warm-up and unpreconditioned parameters ---------------------------

GRAFTED_REFERENCES = [
    ("adam", (0.9, 1.0), lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    (
        "adam-wd",
        (0.9, 1.0),
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    ),
    ("adagrad", (0.0, 1.0), lambda p: torch.optim.Adagrad(p, lr=0.01, eps=1e-10)),
    ("rmsprop", (0.0, 1.0), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8)),
    ("sgd", (0.0, 1.0), lambda p: torch.optim.SGD(p, lr=0.01)),
]


@pytest.mark.parametrize(
    ("grafting", "betas", "make_reference"),
    GRAFTED_REFERENCES,
    ids=[r[0] for r in GRAFTED_REFERENCES],
)
def test_warm_up_and_vectors_take_the_grafted_optimizers_step(grafting, betas, make_reference):
    torch.manual_seed(3)
    params = [
        torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(6, dtype=torch.float64)),
    ]
    references = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = Shampoo(
        params,
        lr=0.01,
        betas=betas,
        weight_decay=0.1 if grafting == "adam-wd" else 0.0,
        grafting=grafting.removesuffix("-wd"),
        precondition_frequency=2,
        start_preconditioning_step=5,
        asynchronous=False,
    )
    reference = make_reference(references)
    for step in range(1, 7):
        grads = [torch.randn_like(p) for p in params]
        for p, r, g in zip(params, references, grads):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.step()
        reference.step()
        # The matrix follows the grafted optimizer until step 5; the vector always does.
        matrix_matches = torch.allclose(params[0], references[0], rtol=1e-12, atol=1e-14)
        assert matrix_matches == (step < 5), step
        torch.testing.assert_close(params[1], references[1], rtol=1e-12, atol=1e-14)


def test_nesterov_preconditions_the_lookahead_momentum():
    torch.manual_seed(4)
    beta1 = 0.9
    weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    optimizer = exact(
        [weight], betas=(beta1, 1.0), grafting="sgd", nesterov=True, start_preconditioning_step=3
    )
    momentum, left, right = np.zeros((3, 4)), 1e-3 * np.eye(3), 1e-3 * np.eye(4)
    for step in range(1, 5):
        grad = torch.randn(3, 4, dtype=torch.float64)
        update = take_step(optimizer, weight, grad)
        g = grad.numpy()
        momentum = beta1 * momentum + (1 - beta1) * g
        lookahead = (beta1 * momentum + (1 - beta1) * g) / (1 - beta1 ** (step + 1))
        left, right = left + g @ g.T, right + g.T @ g
        if step < 3:  # warm-up: the SGD step on the look-ahead momentum
            expected = -0.1 * lookahead
        else:
            direction = matrix_power(left, -0.25) @ lookahead @ matrix_power(right, -0.25)
            expected = -0.1 * np.linalg.norm(lookahead) / np.linalg.norm(direction) * direction
        np.testing.assert_allclose(update, expected, rtol=1e-10, atol=1e-12)


# --- convergence on an ill-conditioned problem --------------------------------------


def conditioned_matrix(size: int, condition: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -math.log10(condition), size, dtype=torch.float64)
    return q1 @ torch.diag(singular_values) @ q2.T


def steps_to_target(make_optimizer, problem, max_steps: int) -> int | None:
    """Steps until ``||A W B - C||^2`` falls to the target, starting from W = 0 (None: not reached)."""
    a, b, c, target = problem
    weight = torch.nn.Parameter(torch.zeros(a.shape[1], b.shape[0], dtype=torch.float64))
    optimizer = make_optimizer([weight])
    for step in range(max_steps + 1):
        optimizer.zero_grad()
        loss = ((a @ weight @ b - c) ** 2).sum()
        if loss.item() <= target:
            return step
        loss.backward()
        optimizer.step()
    return None


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_shampoo_needs_three_times_fewer_steps_than_tuned_adam_and_adagrad(matmul_dtype):
    # min_W ||A W B - C||^2 with cond(A) = cond(B) = 1e3: the Hessian (B B^T) x (A^T A) has
    # condition number 1e12 and Kronecker structure, which Shampoo's factors capture. With
    # bfloat16 products the statistics are noisier but still capture it.
    a, b = conditioned_matrix(16, 1e3, 1), conditioned_matrix(16, 1e3, 2)
    c = a @ torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ b
    problem = (a, b, c, 1e-4 * (c**2).sum().item())
    grid = [0.03, 0.1, 0.3, 1.0, 3.0]

    shampoo_steps = [
        steps_to_target(
            lambda p, lr=lr: Shampoo(
                p,
                lr=lr,
                precondition_frequency=1,
                start_preconditioning_step=1,
                asynchronous=False,
                matmul_dtype=matmul_dtype,
            ),
            problem,
            max_steps=300,
        )
        for lr in grid
    ]
    best = min(s for s in shampoo_steps if s is not None)
    # Every baseline learning rate must fail to reach the target within 3x Shampoo's steps.
    for name, make in [("adam", torch.optim.Adam), ("adagrad", torch.optim.Adagrad)]:
        baseline = [
            steps_to_target(lambda p, lr=lr, make=make: make(p, lr=lr), problem, max_steps=3 * best)
            for lr in grid
        ]
        print(
            f"shampoo {dict(zip(grid, shampoo_steps))}; {name} within {3 * best}: {dict(zip(grid, baseline))}"
        )
        assert all(s is None for s in baseline), name


def test_bfloat16_products_stay_within_bfloat16_precision_of_float32():
    """Statistics and updates with bfloat16 operands, against the float32 products."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(24, 40, generator=generator) for _ in range(6)]
    updates, factors = {}, {}
    for dtype in (None, torch.bfloat16):
        weight = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(1)))
        optimizer = Shampoo(
            [weight],
            precondition_frequency=1,
            start_preconditioning_step=1,
            asynchronous=False,
            matmul_dtype=dtype,
        )
        updates[dtype] = np.stack([take_step(optimizer, weight, g) for g in grads])
        factors[dtype] = optimizer.state[weight]["block_0.factor_0"]
    assert factors[torch.bfloat16].dtype == torch.float32  # statistics keep their dtype
    statistic_error = (factors[torch.bfloat16] - factors[None]).norm() / factors[None].norm()
    update_error = np.linalg.norm(updates[torch.bfloat16] - updates[None]) / np.linalg.norm(
        updates[None]
    )
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9). Measured: statistics
    # 1.2e-3, updates 3.6e-2 (the inverse roots amplify the noise of small eigenvalues).
    assert 1e-4 < statistic_error < 1e-2
    assert 1e-3 < update_error < 1e-1


def test_cast_roots_are_refreshed_whenever_a_root_changes():
    optimizer = Shampoo(
        [torch.nn.Parameter(torch.zeros(3, 4))], matmul_dtype=torch.bfloat16, asynchronous=False
    )
    bucket = optimizer._layouts[0].buckets[0]
    first = bucket.roots_in(torch.bfloat16)
    assert bucket.roots_in(torch.bfloat16) is first  # cached while the roots are unchanged
    assert bucket.roots_in(torch.float32) is bucket.roots  # no copy in the roots' own dtype
    bucket.roots[1][0].copy_(2.0 * torch.eye(4))  # as an install or a broadcast writes
    refreshed = bucket.roots_in(torch.bfloat16)
    assert torch.equal(refreshed[1][0], 2.0 * torch.eye(4, dtype=torch.bfloat16))


# --- asynchronous roots and staleness -------------------------------------------------


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator))
        for _ in range(count)
    ]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for inputs, targets in data:

        def closure(inputs=inputs, targets=targets):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


def blocked_shampoo(model: torch.nn.Module, **overrides) -> Shampoo:
    """Block size 4 gives the small model several buckets and a blocked 8 x 6 weight."""
    settings = dict(lr=0.01, max_preconditioner_dim=4, precondition_frequency=3)
    return Shampoo(model.named_parameters(), **{**settings, **overrides})


def test_async_roots_equal_synchronous_roots_with_the_same_staleness():
    data = batches(12)
    runs = {}
    for asynchronous in (True, False):
        model = small_model(0)
        train(model, blocked_shampoo(model, staleness=2, asynchronous=asynchronous), data)
        runs[asynchronous] = [p.detach().clone() for p in model.parameters()]
    for a, s in zip(runs[True], runs[False]):
        assert torch.equal(a, s)
    # ... and staleness changes the trajectory (the test can tell the difference).
    model = small_model(0)
    train(model, blocked_shampoo(model, staleness=0, asynchronous=False), data)
    assert not all(torch.equal(a, p) for a, p in zip(runs[True], model.parameters()))


def test_staleness_is_exposed_and_bounded_by_frequency_plus_staleness():
    model = small_model(0)
    optimizer = blocked_shampoo(model, precondition_frequency=4, staleness=2)
    seen = []
    for inputs, targets in batches(14):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        seen.append(optimizer.root_staleness)
    # Roots from step 4 arrive at step 6, from step 8 at step 10, from step 12 at step 14.
    assert seen == [None] * 5 + [2, 3, 4, 5, 2, 3, 4, 5, 2]
    assert optimizer.param_groups[0]["start_preconditioning_step"] == 6


def test_raising_staleness_mid_flight_installs_at_the_next_computation():
    model = small_model(0)
    optimizer = blocked_shampoo(model, precondition_frequency=3, staleness=1)
    data = batches(7)
    train(model, optimizer, data[:3])  # roots of step 3 submitted
    optimizer.param_groups[0]["staleness"] = 10
    train(model, optimizer, data[3:5])
    assert optimizer.root_staleness is None  # still pending at step 5
    train(model, optimizer, data[5:6])  # step 6: installed before the next snapshot
    assert optimizer.root_staleness == 3
    assert int(optimizer.state[model[0].weight]["pending_roots_step"]) == 6


# --- checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asynchronous", "staleness"), [(False, 0), (True, 2)], ids=["sync", "async-pending"]
)
def test_state_dict_round_trip_continues_identically(asynchronous, staleness):
    data = batches(10)
    model = small_model(0)
    optimizer = blocked_shampoo(
        model, asynchronous=asynchronous, staleness=staleness, factor_dtype=torch.float64
    )
    train(model, optimizer, data[:4])  # with staleness 2, the roots of step 3 are still pending
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)

    state = optimizer.state[model[0].weight]
    expected_keys = {
        "block_0.factor_0",
        "block_0.root_1",
        "block_0.momentum",
        "block_0.graft_second_moment",
    }
    assert expected_keys <= state.keys()
    assert state["block_0.factor_0"].dtype == torch.float64
    train(model, optimizer, data[4:])

    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: the configs in param_groups are allow-listed
    resumed = small_model(1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = blocked_shampoo(
        resumed, asynchronous=asynchronous, staleness=staleness, factor_dtype=torch.float64
    )
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.state[resumed[0].weight]["block_0.factor_0"].dtype == torch.float64
    train(resumed, resumed_optimizer, data[4:])
    for original, restored in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)


def test_loading_a_state_with_a_different_blocking_names_the_mismatch():
    model = small_model(0)
    optimizer = blocked_shampoo(model)
    train(model, optimizer, batches(1))
    other = blocked_shampoo(small_model(0), max_preconditioner_dim=8)
    with pytest.raises(
        ValueError,
        match=r"'block_0.momentum' of 0.weight is \(4, 4\), expected \(8, 6\)",
    ):
        other.load_state_dict(optimizer.state_dict())
    assert int(other.state[other.param_groups[0]["params"][0]]["step"]) == 0  # nothing changed


# --- failure handling ----------------------------------------------------------------


def test_a_failed_root_keeps_the_previous_one_and_repeated_failures_name_the_block():
    model = small_model(0)
    optimizer = blocked_shampoo(
        model,
        precondition_frequency=1,
        staleness=0,
        asynchronous=False,
        start_preconditioning_step=1,
    )
    data = batches(8)
    train(model, optimizer, data[:2])
    state = optimizer.state[model[2].weight]
    state["block_0.factor_0"][0, 0] = float("nan")  # the statistic stays NaN from now on
    for failures in (1, 2, 3):
        previous = state["block_0.root_0"].clone()
        train(model, optimizer, data[1 + failures : 2 + failures])
        assert torch.equal(state["block_0.root_0"], previous)
        assert optimizer.root_failure_count == failures
        assert int(state["block_0.root_consecutive_failures"][0]) == failures
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(
        RootComputationError, match=r"2\.weight block 0.*dimension 0.*4 times in a row"
    ):
        train(model, optimizer, data[5:6])
    reports = [r for r in optimizer.root_report() if r.total_failures]
    assert [(r.block.split()[0], r.dim) for r in reports] == [("2.weight", 0)]


# --- torch.optim contract --------------------------------------------------------------

BAD_SETTINGS = [
    ({"epsilon": -1.0}, "epsilon: -1.0"),
    ({"max_preconditioner_dim": 0}, "max_preconditioner_dim: 0"),
    ({"precondition_frequency": 0}, "precondition_frequency: 0"),
    ({"lr": -0.1}, "learning rate: -0.1"),
    ({"betas": (1.0, 0.9)}, "index 0: 1.0"),
    ({"betas": (0.9, 0.0)}, "index 1: 0.0"),
    ({"weight_decay": -1.0}, "weight_decay: -1.0"),
    ({"precondition_frequency": 4, "staleness": 5}, "staleness: 5"),
    ({"asynchronous": True, "staleness": 0}, "staleness: 0"),
    ({"start_preconditioning_step": 0}, "start_preconditioning_step: 0"),
    ({"max_preconditioned_dim": 0}, "max_preconditioned_dim: 0"),
    ({"grafting": "lamb"}, "grafting: 'lamb'"),
    ({"roots": "svd"}, "root method: 'svd'"),
    ({"factor_dtype": torch.float16}, "factor_dtype: torch.float16"),
    ({"matmul_dtype": torch.float16}, "matmul_dtype: torch.float16"),
    ({"matmul_dtype": "bfloat17"}, "matmul_dtype: bfloat17"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_configuration_raises_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Shampoo([torch.nn.Parameter(torch.zeros(2, 2))], **settings)


def test_dtypes_may_be_given_by_name():
    """As the command line passes them (``--opt matmul_dtype=bfloat16``)."""
    optimizer = Shampoo(
        [torch.nn.Parameter(torch.zeros(2, 2))], factor_dtype="float64", matmul_dtype="bfloat16"
    )
    group = optimizer.param_groups[0]
    assert (group["factor_dtype"], group["matmul_dtype"]) == (torch.float64, torch.bfloat16)
    assert optimizer.state[group["params"][0]]["block_0.factor_0"].dtype == torch.float64


def test_bad_group_override_raises():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="max_preconditioner_dim: 0"):
        Shampoo([{"params": params, "max_preconditioner_dim": 0}])


def test_params_without_grad_are_skipped_and_same_shape_blocks_still_match_a_solo_run():
    torch.manual_seed(5)
    # Two same-shape matrices share a bucket; only the first ever gets a gradient.
    solo = torch.nn.Parameter(torch.randn(4, 4))
    pair = [torch.nn.Parameter(solo.detach().clone()), torch.nn.Parameter(torch.randn(4, 4))]
    untouched = pair[1].detach().clone()
    settings = dict(precondition_frequency=2, staleness=1)
    solo_optimizer, pair_optimizer = Shampoo([solo], **settings), Shampoo(pair, **settings)
    for _ in range(6):
        grad = torch.randn(4, 4)
        solo.grad, pair[0].grad = grad.clone(), grad.clone()
        solo_optimizer.step()
        pair_optimizer.step()
    assert torch.equal(solo, pair[0])
    assert torch.equal(pair[1], untouched)
    assert torch.equal(pair_optimizer.state[pair[1]]["block_0.factor_0"], 1e-12 * torch.eye(4))


def test_step_returns_the_closure_loss_and_registry_builds_it():
    model = small_model(0)
    optimizer = create_optimizer(
        "shampoo", model, lr=0.05, grafting="sgd", precondition_frequency=2
    )
    assert isinstance(optimizer, Shampoo)
    assert get_spec("shampoo").reference
    losses = train(model, optimizer, batches(1) * 30)
    assert losses[-1] < 0.8 * losses[0]


def test_optimizer_copies_keep_independent_state():
    model = small_model(0)
    optimizer = blocked_shampoo(model, asynchronous=False)
    train(model, optimizer, batches(2))
    saved = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, batches(2))
    assert not torch.equal(
        saved["state"][0]["block_0.factor_0"],
        optimizer.state_dict()["state"][0]["block_0.factor_0"],
    )


def test_non_contiguous_parameters_get_the_same_updates():
    torch.manual_seed(6)
    weight = torch.randn(8, 3, 3, 3)
    plain = torch.nn.Parameter(weight.clone())
    channels_last = torch.nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    assert not channels_last.is_contiguous()
    # Block size 4 splits the 8 output channels: a parameter of two blocks.
    settings = dict(
        max_preconditioner_dim=4, precondition_frequency=1, staleness=0, asynchronous=False
    )
    optimizers = [
        Shampoo([p], start_preconditioning_step=1, **settings) for p in (plain, channels_last)
    ]
    assert "block_1.factor_0" in optimizers[1].state[channels_last]
    for _ in range(3):
        grad = torch.randn(8, 3, 3, 3)
        plain.grad = grad.clone()
        channels_last.grad = grad.clone().to(memory_format=torch.channels_last)
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(plain, channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(plain, weight)


# --- the contract of torch.optim optimizers (issue 13) -----------------------------------


def exact_pair(**overrides) -> dict:
    """float64 statistics and roots, so batched and single roots agree to rounding."""
    return dict(
        factor_dtype=torch.float64, roots=RootConfig(compute_dtype=torch.float64), **overrides
    )


@pytest.mark.parametrize("joins_after", [5, 100])
@pytest.mark.parametrize(
    "settings",
    [
        {},  # the defaults: Adam-grafted warm-up steps
        dict(
            precondition_frequency=1, staleness=0, asynchronous=False, start_preconditioning_step=1
        ),
    ],
    ids=["warm-up", "preconditioned"],
)
def test_a_parameter_joining_late_steps_as_a_fresh_shampoo_would(settings, joins_after):
    generator = torch.Generator().manual_seed(7)

    def randn():
        return torch.randn(4, 6, generator=generator, dtype=torch.float64)

    # Same shape: the late parameter shares a bucket with one that trains from step 1.
    always, late = torch.nn.Parameter(randn()), torch.nn.Parameter(randn())
    alone = torch.nn.Parameter(late.detach().clone())
    optimizer = Shampoo([always, late], **exact_pair(**settings))
    fresh = Shampoo([alone], **exact_pair(**settings))
    for _ in range(joins_after):
        always.grad = randn()
        optimizer.step()
    for _ in range(4):
        grad = randn()
        always.grad, late.grad, alone.grad = randn(), grad.clone(), grad.clone()
        before = late.detach().clone()
        optimizer.step()
        fresh.step()
        torch.testing.assert_close(late, alone, rtol=1e-10, atol=1e-12)
        assert not torch.equal(late, before)
    assert int(optimizer.state[late]["step"]) == 4
    assert int(optimizer.state[always]["group_step"]) == joins_after + 4


def test_copies_and_pickles_are_independent_and_continue_identically():
    data = batches(10)
    model = small_model(0)
    optimizer = blocked_shampoo(model, staleness=2, factor_dtype=torch.float64)
    train(model, optimizer, data[:4])  # a root computation is in flight (from step 3)
    copied = copy.deepcopy({"model": model, "optimizer": optimizer})
    pickled = pickle.loads(pickle.dumps({"model": model, "optimizer": optimizer}))
    factor = optimizer.state[model[0].weight]["block_0.factor_0"]
    saved_factor = factor.clone()

    train(copied["model"], copied["optimizer"], data[4:])
    assert torch.equal(factor, saved_factor)  # the copy has its own state
    train(pickled["model"], pickled["optimizer"], data[4:])
    train(model, optimizer, data[4:])
    for clone in (copied, pickled):
        assert clone["optimizer"].root_staleness == optimizer.root_staleness
        for original, restored in zip(model.parameters(), clone["model"].parameters()):
            assert torch.equal(original, restored)


def test_sparse_gradients_are_rejected_before_anything_changes():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    embedding = torch.nn.Parameter(torch.randn(10, 4))
    optimizer = Shampoo([weight, embedding], precondition_frequency=1, asynchronous=False)
    weight.grad = torch.randn(4, 4)
    embedding.grad = torch.randn(10, 4).to_sparse()
    saved = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match="Shampoo does not support sparse gradients"):
        optimizer.step()
    after = optimizer.state_dict()
    assert int(after["state"][0]["group_step"]) == 0
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key


def test_meta_tensors_step_through_warm_up_roots_and_preconditioning():
    model = small_model(0).to("meta")
    for asynchronous, staleness in ((True, 1), (False, 0)):
        optimizer = blocked_shampoo(
            model,
            precondition_frequency=2,
            staleness=staleness,
            asynchronous=asynchronous,
            start_preconditioning_step=2,
        )
        for _ in range(5):
            for param in model.parameters():
                param.grad = torch.empty_like(param)
            optimizer.step()
        assert optimizer.root_staleness == 1  # roots from step 4, installed by step 5
        state = optimizer.state[model[0].weight]
        assert state["block_0.root_0"].is_meta and state["block_0.root_0"].shape == (4, 4)


def test_maximize_is_minimizing_the_negated_objective():
    data = batches(8)
    runs = {}
    for name, maximize, sign in (
        ("maximize", True, 1.0),
        ("negated", False, -1.0),
        ("min", False, 1.0),
    ):
        model = small_model(0)
        optimizer = blocked_shampoo(
            model,
            maximize=maximize,
            precondition_frequency=2,
            staleness=1,
            start_preconditioning_step=2,
        )
        for inputs, targets in data:
            optimizer.zero_grad()
            (sign * torch.nn.functional.mse_loss(model(inputs), targets)).backward()
            optimizer.step()
        runs[name] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["maximize"], runs["negated"]))
    assert not any(torch.equal(a, b) for a, b in zip(runs["maximize"], runs["min"]))


def test_states_saved_with_one_group_step_count_still_load():
    """Before per-parameter counts, the group's first parameter held the only ``step``."""
    data = batches(8)
    model = small_model(0)
    optimizer = blocked_shampoo(model, staleness=2, factor_dtype=torch.float64)
    train(model, optimizer, data[:4])
    state_dict = copy.deepcopy(optimizer.state_dict())
    for state in state_dict["state"].values():
        group_step = state.pop("group_step", None)
        if group_step is not None:
            state["step"] = group_step
        else:
            del state["step"]
    resumed = small_model(1)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = blocked_shampoo(resumed, staleness=2, factor_dtype=torch.float64)
    resumed_optimizer.load_state_dict(state_dict)
    assert int(resumed_optimizer.state[resumed[2].bias]["step"]) == 4
    train(model, optimizer, data[4:])
    train(resumed, resumed_optimizer, data[4:])
    for original, restored in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)


def test_grafting_configs_validate_what_they_inherit():
    with pytest.raises(ValueError, match="grafting beta2: 1.0"):
        AdamGraftingConfig(beta2=1.0)
    with pytest.raises(ValueError, match="grafting epsilon: 0.0"):
        RMSpropGraftingConfig(epsilon=0.0)
    assert AdamGraftingConfig() == AdamGraftingConfig(beta2=0.999, epsilon=1e-8)
    assert AdamGraftingConfig() != RMSpropGraftingConfig(beta2=0.999, epsilon=1e-8)
