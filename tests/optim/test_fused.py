"""The fused path of LARS, LAMB and ALTO (multi-tensor Triton kernels) against the multi-tensor path.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
by ``tests/conftest.py`` before anything imports Triton); with one, on the GPU. The interpreter is
slow, so most tests shrink the chunks (``_fused.CHUNK_SIZE``, ``BLOCK_SIZE``) so that
tensors of a few thousand elements still span several chunks, full blocks and tails;
one test runs the real sizes. ``test_kernels_compile_for_an_h200`` compiles every
kernel for sm_90 (no GPU needed), which the interpreter alone would not prove.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.overrides import TorchFunctionMode

import largebatch.optim._base as base
import largebatch.optim._fused as fused
import largebatch.optim._layerwise_adam as layerwise_adam
from largebatch.optim import create_optimizer
from largebatch.optim.functional import lamb

pytest.importorskip("triton")  # without a GPU, tests/conftest.py turns the interpreter on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERWISE = ["lars", "lamb", "alto"]
HYPERPARAMETERS = {
    "lars": dict(lr=0.5, momentum=0.9, trust_coef=0.02),
    "lamb": dict(lr=1e-2, betas=(0.8, 0.99)),
    "alto": dict(lr=1e-2, betas=(0.8, 0.99), alpha=-3.0, e_beta1=0.9),
}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2,048 elements in blocks of 256: small tensors cover every kernel branch."""
    monkeypatch.setattr(fused, "CHUNK_SIZE", 2048)
    monkeypatch.setattr(fused, "BLOCK_SIZE", 256)


TRUST_SHAPES = [(4, 1099), (700,), (3, 5), (8, 4), (2, 2), (), (0, 3)]
"""The trust-ratio group: 3 chunks with a tail, 2 blocks and a tail, a tail only, a zero
tensor (zero norm), a tensor whose gradient is always 0, a 0-dim tensor, an empty one."""
EXEMPT_SHAPES = [(5,), (1,), (300,)]
"""The group without trust ratio or weight decay (biases, norm weights)."""


def _problem(steps: int, dtype: torch.dtype = torch.float32, shapes=(TRUST_SHAPES, EXEMPT_SHAPES)):
    """Initial tensors and per-step gradients of the two groups (seeded, on :data:`DEVICE`)."""
    generator = torch.Generator().manual_seed(0)
    trust, exempt = shapes

    def tensor(shape):
        return torch.randn(shape, generator=generator).to(DEVICE, dtype)

    initial = [tensor(s) for s in [*trust, *exempt]]
    if len(trust) > 3:
        initial[3].zero_()
    gradients = [[tensor(s) for s in [*trust, *exempt]] for _ in range(steps)]
    if len(trust) > 4:
        for step_gradients in gradients:
            step_gradients[4].zero_()
    return initial, gradients, len(trust)


def _run(
    name, switch, *, steps=3, dtype=torch.float32, shapes=(TRUST_SHAPES, EXEMPT_SHAPES), **extra
):
    """Parameters and gradients after each step, from one optimizer built by the registry."""
    initial, gradients, split = _problem(steps, dtype, shapes)
    params = [torch.nn.Parameter(t.clone()) for t in initial]
    groups = [
        {"params": params[:split], "weight_decay": 1e-2},
        {"params": params[split:], "weight_decay": 0.0, "trust_ratio": False},
    ]
    optimizer = create_optimizer(name, groups, **{**HYPERPARAMETERS[name], **extra}, **switch)
    trajectory = []
    for step_gradients in gradients:
        for param, grad in zip(params, step_gradients):
            param.grad = grad.clone()
        optimizer.step()
        trajectory.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
    return trajectory, optimizer


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _assert_same_trajectory(ours, reference, initial, tolerance=1e-5):
    """After every step, each tensor's displacement from ``initial`` and each gradient.

    Relative error (norms) below ``tolerance``: float32 rounding, accumulated; the
    displacements rather than the tensors, so an error in a step's size is not diluted
    by the size of the tensor.
    """
    for (params, grads), (expected_params, expected_grads) in zip(ours, reference, strict=True):
        for actual, expected, start in zip(params, expected_params, initial, strict=True):
            assert _relative_error(actual - start, expected - start) < tolerance
        for actual, expected in zip(grads, expected_grads, strict=True):
            assert _relative_error(actual, expected) < tolerance


OPTIONS = {
    "lars": [{}, {"maximize": True, "nesterov": True}, {"clip": True, "eps": 1e-8}],
    "lamb": [{}, {"maximize": True}, {"overwrite_grad": True, "trust_ratio_clamp": (0.5, 2.0)}],
    "alto": [{}, {"maximize": True, "overwrite_grad": True}],
}


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, options) for name, cases in OPTIONS.items() for options in cases],
    ids=lambda value: value if isinstance(value, str) else "-".join(value) or "defaults",
)
def test_fused_follows_the_multi_tensor_path(name, options, small_chunks):
    """Three steps, weight decay, an exempt group, zero norms, a 0-dim tensor, chunk tails."""
    reference, _ = _run(name, {"foreach": True}, **options)
    ours, optimizer = _run(name, {"fused": True}, **options)
    _assert_same_trajectory(ours, reference, _problem(0)[0])
    zero_tensor = ours[0][0][3]
    assert zero_tensor.abs().min() > 0  # a zero tensor moves (trust ratio 1)
    if not options.get("overwrite_grad"):  # p.grad is the caller's gradient, bit for bit
        _, gradients, _ = _problem(3)
        for grad, expected in zip(ours[-1][1], gradients[-1]):
            assert torch.equal(grad, expected)


def test_fused_follows_the_multi_tensor_path_at_the_real_chunk_size():
    """Chunks of ``CHUNK_SIZE``: a tensor of two chunks and a tail, and tiny ones."""
    shapes = ([(2, fused.CHUNK_SIZE + 3), (3, 5)], [(7,)])
    reference, _ = _run("alto", {"foreach": True}, steps=2, shapes=shapes)
    ours, _ = _run("alto", {"fused": True}, steps=2, shapes=shapes)
    _assert_same_trajectory(ours, reference, _problem(0, shapes=shapes)[0])


def test_the_comparison_detects_a_small_error(small_chunks):
    """Negative control: a learning rate 1e-4 off fails the tolerance the tests use."""
    reference, _ = _run("lamb", {"foreach": True}, steps=2)
    off, _ = _run("lamb", {"fused": True}, steps=2, lr=1e-2 * (1 + 1e-4))
    with pytest.raises(AssertionError):
        _assert_same_trajectory(off, reference, _problem(0)[0])


def test_the_functional_form_runs_the_fused_path(small_chunks):
    """``largebatch.optim.functional.lamb(..., fused=True)`` equals the class on the fused path."""
    trajectory, optimizer = _run("lamb", {"fused": True}, steps=2)
    initial, gradients, split = _problem(2)
    params = [t.clone() for t in initial[:split]]
    buffers = [[torch.zeros_like(t) for t in params] for _ in range(2)]
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    for step_gradients in gradients:
        lamb(params, step_gradients[:split], *buffers, steps, lr=1e-2, beta1=0.8, beta2=0.99,
             eps=1e-6, weight_decay=1e-2, fused=True)  # fmt: skip
    for tensor, expected in zip(params, trajectory[-1][0][:split]):
        assert torch.equal(tensor, expected)


def test_state_round_trip_on_the_fused_path(small_chunks):
    """Save after 2 steps, load into a new optimizer, continue: equal to an uninterrupted run."""
    uninterrupted, _ = _run("alto", {"fused": True}, steps=4)
    initial, gradients, split = _problem(4)
    params = [torch.nn.Parameter(t.clone()) for t in initial]

    def build():
        groups = [
            {"params": params[:split], "weight_decay": 1e-2},
            {"params": params[split:], "weight_decay": 0.0, "trust_ratio": False},
        ]
        return create_optimizer("alto", groups, **HYPERPARAMETERS["alto"], fused=True)

    optimizer = build()
    for index, step_gradients in enumerate(gradients):
        if index == 2:
            saved = copy.deepcopy(optimizer.state_dict())
            optimizer = build()
            optimizer.load_state_dict(saved)
        for param, grad in zip(params, step_gradients):
            param.grad = grad.clone()
        optimizer.step()
    for param, expected in zip(params, uninterrupted[-1][0]):
        assert torch.equal(param.detach(), expected)


@pytest.mark.parametrize("name", LAYERWISE)
def test_bfloat16_parameters_keep_bfloat16_state_and_follow_float32(name, small_chunks):
    """bfloat16 tensors, float32 arithmetic: within bfloat16 rounding of a float32 run."""
    reference, _ = _run(name, {"foreach": True}, steps=2)
    ours, optimizer = _run(name, {"fused": True}, steps=2, dtype=torch.bfloat16)
    for state in optimizer.state.values():
        assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "step")
    for actual, expected in zip(ours[-1][0], reference[-1][0]):
        torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)


def test_channels_last_parameters_take_the_fused_path(small_chunks):
    """A dense layout shared by a parameter, its gradient and its state runs fused, as foreach."""
    generator = torch.Generator().manual_seed(1)
    shape = (3, 4, 5, 6)
    start = torch.randn(shape, generator=generator).to(DEVICE)
    grads = [torch.randn(shape, generator=generator).to(DEVICE) for _ in range(2)]
    results = []
    for switch in ({"foreach": True}, {"fused": True}):
        param = torch.nn.Parameter(start.clone().to(memory_format=torch.channels_last))
        optimizer = create_optimizer("lamb", [param], lr=1e-2, weight_decay=1e-2, **switch)
        for grad in grads:
            param.grad = grad.clone().to(memory_format=torch.channels_last)
            optimizer.step()
        results.append(param.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=2e-6, atol=1e-7)


# --- which path runs -----------------------------------------------------------------------


class _Calls:
    """Records each fused-path call on LAMB's dispatch table, then runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = layerwise_adam._PATHS[base.Path.FUSED]

        def counted(group, settings):
            self.count += 1
            original(group, settings)

        monkeypatch.setitem(layerwise_adam._PATHS, base.Path.FUSED, counted)


def _step_lamb(params, **switch):
    for p in params:
        p.grad = torch.ones_like(p)
    create_optimizer("lamb", params, lr=1e-2, **switch).step()


def test_cpu_defaults_to_the_multi_tensor_path(monkeypatch):
    calls = _Calls(monkeypatch)
    _step_lamb([torch.nn.Parameter(torch.ones(4, device=DEVICE))])
    assert calls.count == (1 if DEVICE.type == "cuda" else 0)


def test_default_takes_the_fused_path_where_supported(monkeypatch, small_chunks):
    """On a device type with the fused default, supported groups run fused, others foreach."""
    monkeypatch.setattr(fused, "AUTOMATIC_DEVICE_TYPES", (DEVICE.type,))
    calls = _Calls(monkeypatch)
    float32 = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    float64 = torch.nn.Parameter(torch.ones(4, device=DEVICE, dtype=torch.float64))
    before = float64.detach().clone()
    _step_lamb([float32, float64])
    assert calls.count == 1  # the float32 group; float64 took the multi-tensor path
    assert not torch.equal(float64.detach(), before)
    for switch in ({"foreach": True}, {"fused": False}, {"foreach": False}):
        _step_lamb([float32], **switch)
    assert calls.count == 1

    monkeypatch.setattr(fused, "triton_available", lambda: False)
    _step_lamb([float32])
    assert calls.count == 1


def test_views_into_a_flat_buffer_take_the_fused_path(small_chunks):
    """Addresses 4 bytes past 16-byte boundaries (flat-buffer views): unvectorised kernels, same steps."""
    generator = torch.Generator().manual_seed(2)
    flat = torch.randn(1 + 600 + 7, generator=generator).to(DEVICE)
    grads = [torch.randn(1 + 600 + 7, generator=generator).to(DEVICE) for _ in range(2)]
    results = []
    for switch in ({"foreach": True}, {"fused": True}):
        storage = flat.clone()
        params = [torch.nn.Parameter(storage[1:601]), torch.nn.Parameter(storage[601:])]
        assert all(p.data_ptr() % 16 for p in params)
        optimizer = create_optimizer("lamb", params, lr=1e-2, weight_decay=1e-2, **switch)
        for grad in grads:
            params[0].grad, params[1].grad = grad[1:601].clone(), grad[601:].clone()
            optimizer.step()
        results.append(storage)
    torch.testing.assert_close(results[1], results[0], rtol=2e-6, atol=1e-6)
    assert not fused.group_table([params, [p.grad for p in params]]).aligned


def test_fused_true_on_an_unsupported_group_raises_before_any_change():
    params = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64, device=DEVICE))]
    supported = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    before = [p.detach().clone() for p in (supported, *params)]
    for p in (supported, *params):
        p.grad = torch.ones_like(p)
    optimizer = create_optimizer("lamb", [supported, *params], lr=1e-2, fused=True)
    with pytest.raises(RuntimeError, match="fused=True cannot run: dtype torch.float64"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip((supported, *params), before))
    assert all(not state or state["step"] == 0 for state in optimizer.state.values())


def test_a_gradient_with_another_layout_is_refused(small_chunks):
    param = torch.nn.Parameter(torch.ones(4, 6, device=DEVICE))
    param.grad = torch.ones(6, 4, device=DEVICE).t()  # same shape, transposed strides
    with pytest.raises(RuntimeError, match="memory layout"):
        create_optimizer("lamb", [param], lr=1e-2, fused=True).step()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        create_optimizer("lars", [param], fused=True).step()


@pytest.mark.parametrize(
    ("switch", "message"),
    [
        ({"fused": True, "compiled": True}, "cannot be combined with compiled=True"),
        ({"fused": True, "foreach": True}, "cannot be combined with foreach=True"),
        ({"fused": True, "foreach": False}, "cannot be combined with foreach=False"),
        ({"fused": "yes"}, "Invalid fused value: yes"),
    ],
)
@pytest.mark.parametrize("name", LAYERWISE)
def test_clashing_switches_raise(name, switch, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, [torch.nn.Parameter(torch.ones(2))], **switch)


def test_fused_true_without_triton_raises_at_construction(monkeypatch):
    monkeypatch.setattr(fused, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install 'largebatch\\[triton\\]'"):
        create_optimizer("lamb", [torch.nn.Parameter(torch.ones(2))], fused=True)


def test_old_checkpoints_get_the_automatic_path(small_chunks):
    """Groups saved before the ``fused`` switch existed load with ``fused=None``."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = create_optimizer("lars", [param])
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["fused"]
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["fused"] is None


# --- what a GPU would expose ------------------------------------------------------------------


class _NoHostReads(TorchFunctionMode):
    """Fails on every torch call that reads a tensor's value on the host (a sync on a GPU)."""

    READS = {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
        torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
        torch.Tensor.nonzero, torch.nonzero,
    }  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor in step(): {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_the_mode_catches_host_reads():
    """Negative control for the next test."""
    with _NoHostReads(), pytest.raises(AssertionError, match="item"):
        torch.ones(()).item()
    with _NoHostReads(), pytest.raises(AssertionError, match="__bool__"):
        bool(torch.ones(()) > 0)


@pytest.mark.parametrize("name", LAYERWISE)
def test_a_fused_step_reads_no_tensor_on_the_host(name, small_chunks):
    """No ``.item()``, no branching on tensor values; every parameter's version is bumped.

    On a GPU the step also runs under ``torch.cuda.set_sync_debug_mode("error")``.
    """
    initial, gradients, split = _problem(1)
    params = [torch.nn.Parameter(t.clone()) for t in initial]
    groups = [
        {"params": params[:split], "weight_decay": 1e-2},
        {"params": params[split:], "weight_decay": 0.0, "trust_ratio": False},
    ]
    optimizer = create_optimizer(name, groups, **HYPERPARAMETERS[name], fused=True)
    for param, grad in zip(params, gradients[0]):
        param.grad = grad
    versions = [p._version for p in params]
    if DEVICE.type == "cuda":
        optimizer.step()  # the first step builds the tables (a pinned, non-blocking copy)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoHostReads():
            optimizer.step()
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert all(p._version > version for p, version in zip(params, versions))


@pytest.mark.parametrize("name", LAYERWISE)
def test_autograd_sees_the_fused_step_as_an_in_place_change(name):
    """A graph that saved a parameter before the step refuses to backpropagate after it."""
    param = torch.nn.Parameter(torch.randn(3, 3, device=DEVICE))
    inputs = torch.randn(3, device=DEVICE, requires_grad=True)
    saved = (param @ inputs).sum()  # saves param for the gradient of inputs
    param.grad = torch.ones_like(param)
    create_optimizer(name, [param], fused=True).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


# --- the kernels compile for the GPU --------------------------------------------------------

_COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from largebatch.optim import _fused_kernels as K

    FLOAT_POINTERS = {"scales", "eps_hats", "partial_sums", "coefficients", "ratios",
                      "param_norms", "update_norms"}

    def signature(kernel):
        types = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name.isupper():
                types[name] = "constexpr"
            elif name in FLOAT_POINTERS:
                types[name] = "*fp32"
            elif name.endswith(("addresses", "numels", "chunk_tensors", "chunk_starts",
                                "first_chunks")):
                types[name] = "*i64"
            else:
                types[name] = "fp32"
        return types

    def compile_for_h200(kernel, constexprs):
        source = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel),
                                           constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"enable_fp_fusion": True})
        vector_loads = compiled.asm["ptx"].count("ld.global.v4")
        print(kernel.fn.__name__, constexprs.get("ALIGNED", True), vector_loads)

    sizes = dict(CHUNK=16384, BLOCK=1024)
    cases = [
        (K.adam_direction_kernel, dict(DTYPE=tl.float32, HAS_E=True, MAXIMIZE=True,
                                       OVERWRITE_GRAD=True, APPLY=False, **sizes)),
        (K.adam_direction_kernel, dict(DTYPE=tl.bfloat16, HAS_E=False, MAXIMIZE=False,
                                       OVERWRITE_GRAD=False, APPLY=True, **sizes)),
        (K.apply_direction_kernel, dict(DTYPE=tl.float32, R_IN_GRAD=False, **sizes)),
        (K.apply_direction_kernel, dict(DTYPE=tl.float16, R_IN_GRAD=True, **sizes)),
        (K.lars_kernel, dict(DTYPE=tl.float32, HAS_RATIO=True, NESTEROV=True, MAXIMIZE=True,
                             **sizes)),
        (K.lars_kernel, dict(DTYPE=tl.bfloat16, HAS_RATIO=False, NESTEROV=False,
                             MAXIMIZE=False, **sizes)),
    ]
    for kernel, constexprs in cases:
        for aligned in (True, False):
            compile_for_h200(kernel, {**constexprs, "ALIGNED": aligned})
    compile_for_h200(K.segment_norms_kernel, dict(BLOCK=256))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_an_h200():
    """Every kernel lowers to sm_90 machine code (ptxas), and full blocks load 16 bytes at a time."""
    pytest.importorskip("triton.backends.nvidia")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    vector_loads = [line.split() for line in result.stdout.splitlines()]
    assert len(vector_loads) == 13  # 6 kernels x aligned or not, then the norms kernel
    for name, aligned, count in vector_loads[:12]:  # without the alignment hint: none (control)
        assert (int(count) > 0) == (aligned == "True"), (name, aligned)
