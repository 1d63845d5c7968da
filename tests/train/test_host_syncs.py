"""A training step never makes the host wait for the device.

On a GPU, reading a value of a device tensor on the host (``.item()``,
``.tolist()``, ``bool(t)``, ``float(t)``, printing it, ...) waits until the device
has run everything queued so far, so a loop that reads one per step cannot
queue the next step ahead. These reads look the same on the CPU, so the tests
count them on the CPU: a ``TorchFunctionMode`` sees the Python-level reads and a
``TorchDispatchMode`` the operators that read values (``_local_scalar_dense``,
``nonzero``, ...). Each read is attributed to the training step in progress,
from one call of ``StepDriver.step`` to the next; only the steps at which the loop
reads its losses (evaluations, checkpoints, a full buffer) may read, and, with a
batch-size test, the steps it tests (their statistics are host numbers the
controller compares: a documented exception, counted here). With CUDA,
the same runs on the GPU, with ``torch.cuda.set_sync_debug_mode`` also
reporting every synchronising CUDA call in the steps that must have none.
"""

from __future__ import annotations

import os
import traceback
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from largebatch.optim import list_optimizers
from largebatch.optim.registry import is_decentralized
from largebatch.train import loop, train
from largebatch.train.step import StepDriver
from largebatch.train.step_losses import StepLosses

aten = torch.ops.aten
#: Python-level tensor methods that hand a value to the host
READ_METHODS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "__format__", "__repr__",
}  # fmt: skip
#: operators that wait for the device on CUDA (their output size or value is data-dependent)
SYNCING_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.equal.default, aten.is_nonzero.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
}  # fmt: skip
#: host-side tensors read by design: the sampler draws each epoch's permutation on the CPU
HOST_BY_DESIGN = (str(Path("torch", "utils", "data", "distributed.py")),)
#: frames of the counting itself
IGNORED_FRAMES = (
    str(Path("torch", "overrides.py")), str(Path("torch", "utils", "_python_dispatch.py")),
    Path(__file__).name,
)  # fmt: skip


class HostReads(TorchFunctionMode):
    """Records every host read, with the training step it happened in."""

    def __init__(self, sync_debug: bool = False) -> None:
        super().__init__()
        self.step = 0  # the step in progress (1-based), 0 before the first
        self.reads: list[tuple[int, str, str]] = []  # (step, what, where)
        self.quiet_steps: set[int] = set()  # steps that must not read (CUDA sync debug)
        self._ops = _SyncingOps(self)
        self._sync_debug = sync_debug

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_METHODS:
            self.record(name)
        return func(*args, **(kwargs or {}))

    def record(self, what: str) -> None:
        stack = [f for f in traceback.extract_stack() if not f.filename.endswith(IGNORED_FRAMES)]
        if any(f.filename.endswith(HOST_BY_DESIGN) for f in stack):
            return
        ours = [f for f in stack if f"{os.sep}largebatch{os.sep}" in f.filename]
        frame = (ours or stack)[-1]
        self.reads.append((self.step, what, f"{frame.filename}:{frame.lineno}"))

    def start_step(self) -> None:
        self.step += 1
        if self._sync_debug:
            torch.cuda.set_sync_debug_mode("warn" if self.step in self.quiet_steps else 0)

    def __enter__(self):
        self._ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._ops.__exit__(*exc)
        if self._sync_debug:
            torch.cuda.set_sync_debug_mode(0)


class _SyncingOps(TorchDispatchMode):
    def __init__(self, owner: HostReads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            self.owner.record(str(func))
        return func(*args, **(kwargs or {}))


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reads_per_step(monkeypatch, config, quiet_steps=(), task=None) -> HostReads:
    """Train ``config`` under :class:`HostReads` and return it."""
    reads = HostReads(sync_debug=config.device == "cuda")
    reads.quiet_steps = set(quiet_steps)
    step = StepDriver.step

    def counted_step(*args, **kwargs):
        reads.start_step()
        return step(*args, **kwargs)

    monkeypatch.setattr(StepDriver, "step", counted_step)
    with warnings.catch_warnings(record=True) as caught, reads:
        warnings.simplefilter("always")
        result = train(config, task=task)
    for warning in caught:  # CUDA's sync debug mode warns in the quiet steps only
        if "synchroniz" in str(warning.message):
            reads.reads.append((-1, "cuda sync", f"{warning.filename}:{warning.lineno}"))
    assert result.status == "done", result.error
    return reads


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "settings",
    [{}, {"accumulation_steps": 2, "noise_scale": True, "noise_scale_every": 1}],
    ids=["plain", "accumulation+noise-scale"],
)
def test_steps_between_evaluations_read_nothing_from_the_device(
    make_config, monkeypatch, device, settings
):
    # 8 steps per epoch; evaluations at 0, 4, 8, 12 (the end), a checkpoint at 6
    config = make_config(
        steps=12, eval_every=4, checkpoint_every=6, device=device, progress=True, **settings
    )
    reading = {4, 6, 8, 12}
    quiet = set(range(1, 13)) - reading
    reads = reads_per_step(monkeypatch, config, quiet)
    assert reads.step == 12
    in_quiet_steps = [r for r in reads.reads if r[0] in quiet or r[0] == -1]
    assert in_quiet_steps == []
    # the steps that read do read (the losses, the evaluation): the counting sees them
    assert {step for step, _, _ in reads.reads} >= {0} | reading


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("settings", "tested"),
    [
        ({"batch_growth": "geometric", "batch_growth_options": {"factor": 1.2}}, set()),
        (
            {"batch_growth": "norm-test", "batch_growth_theta": 0.3},
            {1, 5, 9},  # with every=4: steps 1, 5, 9
        ),
        ({"averaging": "polyak", "averaging_start": 2}, set()),
        ({"averaging": "ema", "averaging_decay": 0.9}, set()),
    ],
    ids=["geometric", "norm-test-every-4", "polyak", "ema"],
)
def test_growth_and_averaging_read_only_on_the_steps_a_test_takes(
    make_config, monkeypatch, device, settings, tested
):
    """Geometric growth and the iterate averages read nothing; the norm test (every 4th
    step) reads its statistics on the steps it tests, and on no other."""
    if settings.get("batch_growth") == "norm-test":
        settings = settings | {"batch_growth_options": {"every": 4}}
    if "batch_growth" in settings:
        settings = settings | {"max_batch_size": 64}
    config = make_config(
        steps=12, eval_every=4, checkpoint_every=6, device=device, schedule="constant",
        **settings,
    )  # fmt: skip
    reading = {4, 6, 8, 12}
    quiet = set(range(1, 13)) - reading - tested
    reads = reads_per_step(monkeypatch, config, quiet)
    assert reads.step == 12
    assert [r for r in reads.reads if r[0] in quiet or r[0] == -1] == []
    statistics = {step for step, _, where in reads.reads if "per_example" in where}
    assert statistics == tested  # and the counting sees the tested steps read


def test_a_read_per_step_is_caught(make_config, monkeypatch):
    """Negative control: a loss function that reads its value (as the loop once did)."""
    from tiny_train_task import build

    task = build()
    loss_fn = task.loss_fn

    def loss_read_per_step(outputs, targets):
        loss = loss_fn(outputs, targets)
        assert loss.item() >= 0
        return loss

    task.loss_fn = loss_read_per_step
    reads = reads_per_step(monkeypatch, make_config(steps=6, eval_every=6), task=task)
    steps = [step for step, what, _ in reads.reads if what == "item"]
    assert set(range(1, 6)) <= set(steps)


def test_losses_are_read_at_least_every_capacity_steps(make_config, monkeypatch):
    """Between evaluations far apart, the loop still reads (and checks) its losses."""
    monkeypatch.setattr(loop, "StepLosses", partial(StepLosses, capacity=3))
    reads = reads_per_step(monkeypatch, make_config(steps=10, eval_every=100))
    read_steps = {step for step, what, _ in reads.reads if what == "tolist"}
    assert read_steps == {0, 3, 6, 9, 10}  # 0 and 10: evaluations


#: optimizers whose algorithm decides on the host within a step, by design
HOST_DECISIONS = {
    "newton-cg": "CG's stopping and curvature tests and the Armijo search compare on the host",
    "lbfgs": "torch's L-BFGS and the Armijo search compare on the host",
    "saga": "checks the batch's indices and folds repeated ones into its table",
}
#: the classical methods with their own loop protocols, whose steps read nothing
CLASSICAL_WITHOUT_READS = {
    "svrg": {"inner_steps": 3},  # snapshots (full passes) at steps 1, 4 and 7
    "olbfgs": {},
    "sqn": {"update_every": 2},  # Hessian-vector products every other step
}


@pytest.mark.parametrize("name", CLASSICAL_WITHOUT_READS)
def test_classical_protocols_read_nothing_in_the_loop(make_config, monkeypatch, name):
    """Snapshots, loss closures and Hessian samples, driven by the loop, read nothing (CPU)."""
    config = make_config(
        optimizer=name, optimizer_options=CLASSICAL_WITHOUT_READS[name], lr=None, steps=8,
        eval_every=8,
    )  # fmt: skip
    reads = reads_per_step(monkeypatch, config, quiet_steps=range(2, 8))
    assert [r for r in reads.reads if 2 <= r[0] < 8] == []
    assert {step for step, _, _ in reads.reads} >= {0, 8}  # evaluations: the counting sees them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize(
    "name",
    [
        spec.name
        for spec in list_optimizers()
        if spec.name not in HOST_DECISIONS and not is_decentralized(spec.name)
    ],
)
def test_registered_optimizers_do_not_synchronise_on_cuda(make_config, monkeypatch, name):
    """Every optimizer's steps 2-7 (after its state exists) without a synchronising CUDA call
    (but those of :data:`HOST_DECISIONS`; the decentralized ones need processes).

    Only CUDA's own report counts here: on the CPU, reads of the step counters that
    some optimizers keep on the host by design look like device reads.
    """
    config = make_config(optimizer=name, lr=None, steps=8, eval_every=8, device="cuda")
    reads = reads_per_step(monkeypatch, config, quiet_steps=range(2, 8))
    assert [r for r in reads.reads if r[1] == "cuda sync"] == []
