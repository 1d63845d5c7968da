"""Shampoo's optimizer step: time, operations per step, and the GPU targets of issue 12.

Parameter sets: those of ``optimizer_step.py``: ResNet-50's 161 tensors (25.6M parameters)
and a transformer of width 768 (4 blocks, 28.3M parameters in 50 tensors, on the CPU; 12
blocks, 85M in 146, on CUDA). Gradients are fixed random tensors; only ``optimizer.step()``
is timed. Three sections, chosen with ``--sections``:

**steps** (per parameter set and block size, root frequency F = 100). Every time is
reported twice: wall clock, and the CPU time of the stepping thread (``time.thread_time``;
on CUDA the wall clock after synchronising, the CPU time then only says how busy the
launching thread was). On a shared machine the wall clock mostly measures the neighbours'
load; thread CPU time measures our work, and the root thread's work is not in it. Variants
that are compared are stepped round-robin, so they see the same load; figures are medians.
``--threads`` sets the intra-op threads (default 1: the matrix-product rate is then one
core's, and the root thread can use another). Rows:

* floor: statistics FLOPs per step (``2 n_d numel(block)`` per block and dimension) over the
  float32 1024 x 1024 matrix-product rate measured in the same run. Preconditioning costs
  the same FLOPs again, so a second floor counts both;
* Shampoo, once with float32 products (the default) and once with bfloat16 products
  (``matmul_dtype=torch.bfloat16``; statistics and roots stay float32):

  - statistics only: a step before ``start_preconditioning_step`` (grafted step);
  - roots disabled: a step that preconditions with fixed roots (between root computations);
  - async roots, amortized: one root cycle of F steps, i.e. the measured window from the
    snapshot to the install (``staleness + 1`` steps, roots computed on the background
    thread meanwhile) plus ``F - staleness - 1`` plain steps, over F. The plain steps are
    the median of 3 steps just before and 3 just after the window. Full mode also gives
    the synchronous amortized time (the root step measured);

* ScalableShampoo (pytorch-optimizer) at the same block size and frequency:
  ``((F - 1) regular + root step) / F`` (``scalable_*_vs_ours`` on each amortized row);
* fused AdamW.

Full mode also compares implementation choices on ResNet-50 on the CPU: float64 statistics
and roots, one block per bucket (no batching), one bucket per shape (no size cap), and
coupled-Newton against eigh roots.

**ops**: aten operations per steady preconditioned step (no root refresh), counted with a
``TorchDispatchMode``, views excluded, and an estimate of the kernels they launch on CUDA
(a list operation is one multi-tensor kernel when its tensors are dense with matching
shapes, else one kernel per tensor). On the CPU they are counted twice: with the CPU's
bucket layout, and with the layout of every other device, on ``meta`` tensors (no data, the
same operations a CUDA step launches before CUDA graphs). Meta's ``DistributedShampoo`` is
counted beside when it is importable.

**targets** (issue 12, section 3: ResNet-50 shapes, block 1024, roots every 50 steps, 125
steps, amortized over the last 100): each step timed alone (wall clock, synchronised), its
median and the mean of the last steps (amortized); the time of the step's matrix products
alone (statistics and preconditioning of every bucket, nothing else); Meta's
``DistributedShampoo`` at equal settings when it is importable (same block size, frequency,
betas, epsilon, Adam grafting, eigendecomposed roots; blocks merged to matrices
(``target_parameter_dimensionality=2``) and 1-D parameters left to the grafting
(``inverse_exponent_override={1: 0.0}``), as ours). Ours preconditions from the first step
(with identity roots until the first install), Meta's from its earliest allowed step, the
root frequency: the steps of Meta's before it are cheaper grafted steps, which favours
Meta's amortized time. Printed beside the issue's targets,
which are for one H200: median step within 2x of its matrix products, amortized step at
least 5x faster than Meta's, root refreshes adding at most 20% to the median step.

Run: ``python benchmarks/shampoo_step.py [--device cpu|cuda] [--quick] [--threads 1]
[--staleness 10] [--sections steps,ops,targets] [--target-steps 125 --target-frequency 50]``
(CPU, ``steps,ops`` by default: full about 10 minutes on the shared 2-core machine,
``--quick`` (block 256 only, staleness 5) about 2 minutes; CUDA: every section).
Meta's optimizer is never a dependency: put its ``distributed_shampoo`` package on
``PYTHONPATH`` to include it. ``run_shampoo_benchmark(quick)`` returns the step rows, for
``optimizer_step.py``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from optimizer_step import Shapes, resnet50_shapes, transformer_shapes  # the shared parameter sets
from pytorch_optimizer import ScalableShampoo
from torch.utils._python_dispatch import TorchDispatchMode

from largebatch.optim.shampoo import CoupledNewtonConfig, RootConfig, Shampoo, preconditioner
from largebatch.optim.shampoo.blocking import plan_blocking

try:  # Meta's Shampoo, a baseline only when the user has it
    import distributed_shampoo
except ImportError:
    distributed_shampoo = None

FREQUENCY = 100
CPU = torch.device("cpu")
DISABLED = 10**9  # a frequency or start step that is never reached
Row = dict[str, object]
TARGETS = {"median / matrix products": 2.0, "Meta amortized / ours": 5.0, "root stall": 0.20}


def param_sets(device: torch.device) -> dict[str, Shapes]:
    """ResNet-50 and a transformer: 12 blocks on CUDA (the issue's), 4 on the CPU (minutes, not hours)."""
    layers = 12 if device.type == "cuda" else 4
    return {"resnet50": resnet50_shapes(), "transformer": transformer_shapes(layers)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock and thread-CPU seconds of repeated calls (synchronised on CUDA); medians."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, run: Callable[[], object]) -> None:
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.thread_time()
        run()
        synchronize(self.device)
        self.cpu.append(time.thread_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    @property
    def median(self) -> tuple[float, float]:
        return statistics.median(self.wall), statistics.median(self.cpu)


def round_robin(
    runs: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of each run, the runs called in turn ``rounds`` times."""
    timers = {name: Timer(device) for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timers[name](run)
    return {name: timer.median for name, timer in timers.items()}


def matmul_gflops(device: torch.device, size: int = 1024, repeats: int = 9) -> float:
    """float32 matrix-product rate: by thread CPU time on the CPU, wall clock on CUDA."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    a @ b
    wall, cpu = round_robin({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * size**3 / (wall if device.type == "cuda" else cpu) / 1e9


def statistics_gflop(shapes: Shapes, block: int) -> float:
    """FLOPs of one step's statistics products ``G_(d) G_(d)^T`` (the same again to precondition)."""
    total = 0
    for shape in shapes:
        for b in plan_blocking("p", shape, block, 8192).blocks:
            total += sum(2 * n * b.numel for n in b.shape)
    return total / 1e9


def parameters_with_grads(shapes: Shapes, device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator).to(device))
        param.grad = 1e-3 * torch.randn(shape, generator=generator).to(device)
        params.append(param)
    return params


def set_groups(optimizer: torch.optim.Optimizer, **settings: object) -> Callable[[], None]:
    """A step after setting hyperparameters (as a schedule would)."""

    def run() -> None:
        for group in optimizer.param_groups:
            group.update(settings)
        optimizer.step()

    return run


def shampoo(shapes: Shapes, block: int, device: torch.device, **options: object) -> Shampoo:
    """Shampoo preconditioning from step 1, roots never due until a window asks for them."""
    settings = dict(
        max_preconditioner_dim=block, precondition_frequency=DISABLED, start_preconditioning_step=1
    )
    optimizer = Shampoo(parameters_with_grads(shapes, device), **{**settings, **options})
    optimizer.step()  # first touch of every buffer
    return optimizer


def root_window(optimizer: Shampoo, staleness: int, device: torch.device) -> Timer:
    """Time the steps from the statistics snapshot to the roots' install (one step when synchronous)."""
    timer = Timer(device)
    step = int(optimizer.state[optimizer.param_groups[0]["params"][0]]["group_step"])
    timer(set_groups(optimizer, precondition_frequency=step + 1, staleness=staleness))
    for _ in range(staleness):
        timer(set_groups(optimizer, precondition_frequency=DISABLED))
    assert optimizer.root_staleness == staleness and optimizer.root_failure_count == 0
    return timer


def amortized(window: Timer, plain: tuple[float, float], staleness: int) -> tuple[float, float]:
    """(wall, cpu) per step over one cycle of F steps."""
    return tuple(
        (sum(times) + (FREQUENCY - staleness - 1) * p) / FREQUENCY
        for times, p in zip((window.wall, window.cpu), plain)
    )


def row(
    param_set: str,
    shapes: Shapes,
    block: int,
    variant: str,
    times: tuple[float, float],
    **extra: object,
) -> Row:
    return {
        "param_set": param_set,
        "params_m": round(sum(torch.Size(s).numel() for s in shapes) / 1e6, 1),
        "tensors": len(shapes),
        "block": block,
        "frequency": FREQUENCY,
        "variant": variant,
        "wall_s": times[0],
        "cpu_s": times[1],
        **extra,
    }


def async_cycle(
    optimizer: Shampoo, plain: tuple[float, float], staleness: int, device: torch.device
) -> tuple[tuple[float, float], tuple[float, float], Timer]:
    """(amortized cycle, plain step around the window, the window) of one async root cycle."""
    before = round_robin({"plain": optimizer.step}, 3, device)["plain"]
    window = root_window(optimizer, staleness, device)
    after = round_robin({"plain": optimizer.step}, 3, device)["plain"]
    around = tuple(statistics.median(pair) for pair in zip(before, after, plain))
    return amortized(window, around, staleness), around, window


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
"""Shampoo's ``matmul_dtype`` variants, by row label."""


def benchmark_set(
    param_set: str,
    shapes: Shapes,
    block: int,
    rounds: int,
    staleness: int,
    full: bool,
    device: torch.device,
) -> list[Row]:
    rate = matmul_gflops(device)
    gflop = statistics_gflop(shapes, block)
    floor = gflop / rate
    ours = {
        label: shampoo(shapes, block, device, staleness=staleness, matmul_dtype=dtype)
        for label, dtype in PRECISIONS.items()
    }
    theirs = ScalableShampoo(
        parameters_with_grads(shapes, device), lr=1e-3, block_size=block,
        preconditioning_compute_steps=FREQUENCY, start_preconditioning_step=1,
    )  # fmt: skip
    theirs.step()
    adamw = torch.optim.AdamW(parameters_with_grads(shapes, device), lr=1e-3, fused=True)
    adamw.step()
    runs = {}
    for label, optimizer in ours.items():
        runs[f"{label} statistics only"] = set_groups(
            optimizer, start_preconditioning_step=DISABLED
        )
        runs[f"{label} roots disabled"] = set_groups(optimizer, start_preconditioning_step=1)
    steps = round_robin({**runs, "scalable": theirs.step, "adamw": adamw.step}, rounds, device)

    theirs.preconditioning_compute_steps = theirs.param_groups[0]["step"] + 1
    root_step = Timer(device)
    root_step(theirs.step)
    theirs_cycle = tuple(
        ((FREQUENCY - 1) * r + s) / FREQUENCY for r, s in zip(steps["scalable"], root_step.median)
    )

    rows = [
        row(param_set, shapes, block, "floor: statistics products", (floor, floor), gflop=round(gflop, 1), gflops=round(rate)),
        row(param_set, shapes, block, "floor: statistics + preconditioning", (2 * floor, 2 * floor)),
    ]  # fmt: skip
    for label, optimizer in ours.items():
        plain = steps[f"{label} roots disabled"]
        cycle, around, window = async_cycle(optimizer, plain, staleness, device)
        only = steps[f"{label} statistics only"]
        rows += [
            row(param_set, shapes, block, f"shampoo {label}: statistics only", only, cpu_vs_floor=only[1] / floor),
            row(param_set, shapes, block, f"shampoo {label}: roots disabled", plain, cpu_vs_floor=plain[1] / floor, cpu_vs_2floor=plain[1] / (2 * floor)),
            row(
                param_set, shapes, block, f"shampoo {label}: async roots (staleness {staleness}), amortized", cycle,
                wall_vs_roots_disabled=cycle[0] / around[0], cpu_vs_roots_disabled=cycle[1] / around[1],
                window_wall_s=round(sum(window.wall), 2), window_steps=staleness + 1,
                scalable_cpu_vs_ours=theirs_cycle[1] / cycle[1], scalable_wall_vs_ours=theirs_cycle[0] / cycle[0],
            ),
        ]  # fmt: skip
    if full:
        synchronous = root_window(
            shampoo(shapes, block, device, staleness=0, asynchronous=False), 0, device
        )
        rows.append(
            row(
                param_set,
                shapes,
                block,
                "shampoo float32: sync roots, amortized",
                amortized(synchronous, steps["float32 roots disabled"], 0),
                root_step_wall_s=round(synchronous.wall[0], 2),
            )
        )
    rows += [
        row(
            param_set, shapes, block, "ScalableShampoo (pytorch-optimizer), amortized", theirs_cycle,
            regular_step_cpu_s=round(steps["scalable"][1], 3), root_step_cpu_s=round(root_step.cpu[0], 2),
        ),
        row(param_set, shapes, block, "AdamW (fused)", steps["adamw"]),
    ]  # fmt: skip
    del ours, theirs, adamw
    gc.collect()
    return rows


@contextmanager
def bucket_cap(numel: int):
    saved = preconditioner.MAX_BUCKET_NUMEL
    preconditioner.MAX_BUCKET_NUMEL = numel
    try:
        yield
    finally:
        preconditioner.MAX_BUCKET_NUMEL = saved


def implementation_choices(shapes: Shapes, rounds: int, device: torch.device) -> list[Row]:
    """Each implementation choice against its alternative, stepped round-robin on ResNet-50 (CPU)."""
    rows = []
    for block in (1024, 256):
        variants = {
            "default": shampoo(shapes, block, device),
            "float64": shampoo(shapes, block, device, factor_dtype=torch.float64),
        }
        for name, cap in (("unbatched", 1), ("uncapped", 2**40)):
            with bucket_cap(cap):
                variants[name] = shampoo(shapes, block, device)
        times = round_robin(
            {name: optimizer.step for name, optimizer in variants.items()}, rounds, device
        )
        base = times["default"][1]
        labels = {
            "default": f"float32 statistics/roots, buckets <= {preconditioner.MAX_BUCKET_NUMEL} elements (default)",
            "float64": "float64 statistics/roots",
            "unbatched": "one block per bucket (no batching)",
            "uncapped": "one bucket per shape (no size cap)",
        }
        rows += [
            row(
                "resnet50",
                shapes,
                block,
                f"choice, roots disabled: {labels[name]}",
                t,
                cpu_vs_default=t[1] / base,
            )
            for name, t in times.items()
        ]
        del variants
        gc.collect()
    roots = {}
    for name, config in (
        ("eigh (default)", RootConfig()),
        ("coupled Newton", RootConfig(method=CoupledNewtonConfig())),
    ):
        optimizer = shampoo(shapes, 256, device, staleness=0, asynchronous=False, roots=config)
        roots[name] = root_window(optimizer, 0, device)
    rows += [
        row(
            "resnet50",
            shapes,
            256,
            f"choice: all roots once, {name}",
            timer.median,
            cpu_vs_eigh=timer.cpu[0] / roots["eigh (default)"].cpu[0],
        )
        for name, timer in roots.items()
    ]
    return rows


def run_shampoo_benchmark(
    quick: bool,
    staleness: int | None = None,
    param_sets_by_name: dict[str, Shapes] | None = None,
    device: torch.device = CPU,
) -> list[Row]:
    """All step rows: per parameter set and block size (256 only when quick; 1024 and 256 otherwise)."""
    sets = param_sets_by_name or param_sets(device)
    staleness = staleness or (5 if quick else 10)
    rounds = 3 if quick else 5
    blocks = [256] if quick else [1024, 256]
    rows = [
        r
        for name, shapes in sets.items()
        for block in blocks
        for r in benchmark_set(name, shapes, block, rounds, staleness, not quick, device)
    ]
    if not quick and param_sets_by_name is None and device.type == "cpu":
        rows += implementation_choices(sets["resnet50"], rounds, device)
    return rows


def format_rows(rows: list[Row]) -> str:
    fixed = ("param_set", "params_m", "tensors", "block", "frequency", "variant", "wall_s", "cpu_s")
    lines = [
        f"{'set':<11} {'params':>6}/{'n':<3} {'block':<5} {'variant':<76} {'wall s':>8} {'cpu s':>8}"
    ]
    for r in rows:
        extra = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k not in fixed
        )
        lines.append(
            f"{r['param_set']:<11} {r['params_m']:>5}M/{r['tensors']:<3} {r['block']:<5} {r['variant']:<76} "
            f"{r['wall_s']:8.3f} {r['cpu_s']:8.3f}  {extra}"
        )
    return "\n".join(lines)


# --- operations per step ----------------------------------------------------------------


class OperationCounter(TorchDispatchMode):
    """aten operations that compute (views excluded), and the kernels they would launch on CUDA.

    Operations whose tensors are all on the CPU while the parameters are not (host-side
    step counters) launch nothing and are not counted.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.operations = 0
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            tensors = [t for t in _tensors((args, kwargs))]
            if any(t.device.type == self.device.type for t in tensors):
                self.operations += 1
                self.launches += _launches(func, args)
        return func(*args, **kwargs)


def _tensors(value: object):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _launches(func, args: tuple) -> int:
    """One kernel, or for a list operation that cannot use its multi-tensor kernel one per tensor."""
    if not func.__name__.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and torch.is_tensor(a[0])]
    first = lists[0]
    dense = all(t.is_contiguous() for tensors in lists for t in tensors)
    same = all(
        len(tensors) == len(first) and all(t.shape == f.shape for t, f in zip(tensors, first))
        for tensors in lists
    )
    return 1 if dense and same else len(first)


def count_step(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, int]:
    """(operations, kernel launches) of one ``optimizer.step()``."""
    with OperationCounter(device) as counter:
        optimizer.step()
    return counter.operations, counter.launches


def meta_shampoo(params: list[torch.Tensor], block: int, frequency: int):
    """Meta's DistributedShampoo at the settings of ours (see the module docstring)."""
    ds = distributed_shampoo
    return ds.DistributedShampoo(
        params, lr=1e-3, betas=(0.9, 1.0), epsilon=1e-12, max_preconditioner_dim=block,
        precondition_frequency=frequency, start_preconditioning_step=frequency,
        grafting_config=ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
        distributed_config=ds.SingleDeviceDistributedConfig(target_parameter_dimensionality=2),
        preconditioner_config=ds.RootInvShampooPreconditionerConfig(inverse_exponent_override={1: 0.0}),
    )  # fmt: skip


def operation_counts(sets: dict[str, Shapes], blocks: list[int], device: torch.device) -> str:
    """A table of operations and estimated launches per steady preconditioned step."""
    layouts = [(device.type, device)]
    if device.type == "cpu":
        layouts.append(("other devices (meta)", torch.device("meta")))
    lines = [f"{'set':<11} {'block':<5} {'optimizer, layout':<44} {'ops':>6} {'launches':>9}"]
    for name, shapes in sets.items():
        for block in blocks:
            for label, layout_device in layouts:
                # Eager: a replayed CUDA graph launches the same kernels as one graph.
                optimizer = shampoo(
                    shapes, block, layout_device, asynchronous=False, cuda_graphs=False
                )
                ops, launches = count_step(optimizer, layout_device)
                lines.append(f"{name:<11} {block:<5} {'ours, ' + label:<44} {ops:>6} {launches:>9}")
                del optimizer
            if distributed_shampoo is not None:
                # Roots every 2 steps, from step 2: step 3 preconditions without computing any.
                theirs = meta_shampoo(parameters_with_grads(shapes, device), block, 2)
                theirs.step()
                theirs.step()
                ops, launches = count_step(theirs, device)
                lines.append(f"{name:<11} {block:<5} {'Meta DistributedShampoo, ' + device.type:<44} {ops:>6} {launches:>9}")  # fmt: skip
                del theirs
            gc.collect()
    return "\n".join(lines)


# --- the GPU targets of issue 12 ----------------------------------------------------------


def step_times(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each of ``steps`` steps, synchronised."""
    timer = Timer(device)
    for _ in range(steps):
        timer(optimizer.step)
    return timer.wall


def matrix_products_seconds(optimizer: Shampoo, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one step's matrix products alone: statistics and preconditioning of every bucket."""
    work = []
    for layout in optimizer._layouts:
        for bucket in layout.buckets:
            count = len(bucket.members)
            grads = torch.randn(count, *bucket.shape, device=device)
            factors = [f.clone() for f in bucket.factors]
            work.append((factors, grads, bucket.roots))

    def products() -> None:
        for factors, grads, roots in work:
            preconditioner.accumulate_statistics(factors, grads, 1.0)
            preconditioner.precondition(roots, grads)

    products()
    timer = Timer(device)
    for _ in range(repeats):
        timer(products)
    return statistics.median(timer.wall)


def issue_targets(
    sets: dict[str, Shapes],
    device: torch.device,
    block: int,
    frequency: int,
    steps: int,
    window: int,
) -> str:
    """Median, amortized and matrix-product times of ours and Meta's, beside the issue's targets."""
    lines = [
        f"block {block}, roots every {frequency} steps, {steps} steps, amortized over the last "
        f"{window}; wall-clock seconds, synchronised; targets for one H200 (issue 12)"
    ]
    for name, shapes in sets.items():
        ours = Shampoo(
            parameters_with_grads(shapes, device),
            max_preconditioner_dim=block,
            precondition_frequency=frequency,
            start_preconditioning_step=1,  # every timed step preconditions
        )
        times = step_times(ours, steps, device)[-window:]
        median, mean = statistics.median(times), statistics.fmean(times)
        products = matrix_products_seconds(ours, device)
        stall = mean / median - 1.0
        lines += [
            f"{name}: ours median {median:.4f} s, amortized {mean:.4f} s, matrix products {products:.4f} s",
            f"  median / matrix products = {median / products:.2f} (target <= {TARGETS['median / matrix products']})",
            f"  root stall = amortized / median - 1 = {stall:.2f} (target <= {TARGETS['root stall']})",
        ]  # fmt: skip
        del ours
        gc.collect()
        if distributed_shampoo is None:
            lines.append(
                "  Meta's DistributedShampoo: not importable (target: >= 5x faster amortized)"
            )
            continue
        theirs = meta_shampoo(parameters_with_grads(shapes, device), block, frequency)
        their_times = step_times(theirs, steps, device)[-window:]
        their_mean = statistics.fmean(their_times)
        lines += [
            f"  Meta DistributedShampoo: median {statistics.median(their_times):.4f} s, amortized {their_mean:.4f} s",
            f"  Meta amortized / ours = {their_mean / mean:.2f} (target >= {TARGETS['Meta amortized / ours']})",
        ]  # fmt: skip
        del theirs
        gc.collect()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--sections",
        default=None,
        help="comma-separated: steps, ops, targets (default: steps,ops on the CPU; all on CUDA)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="block 256 only, staleness 5, 3 rounds"
    )
    parser.add_argument(
        "--staleness", type=int, default=None, help="root window length (default 10; quick 5)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--target-steps", type=int, default=125)
    parser.add_argument("--target-frequency", type=int, default=50)
    parser.add_argument("--target-window", type=int, default=100)
    parser.add_argument("--target-block", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device(args.device)
    sections = args.sections or ("steps,ops,targets" if device.type == "cuda" else "steps,ops")
    sections = sections.split(",")
    torch.set_num_threads(args.threads)
    meta = "importable" if distributed_shampoo is not None else "not importable"
    print(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s); Meta's distributed_shampoo {meta}"
    )
    sets = param_sets(device)
    blocks = [256] if args.quick else [1024, 256]
    if "ops" in sections:
        print(
            "\nOperations per steady preconditioned step (views excluded), estimated CUDA launches"
        )
        print(operation_counts(sets, blocks, device))
    if "steps" in sections:
        print("\nStep times: medians of wall-clock and thread-CPU seconds")
        print(format_rows(run_shampoo_benchmark(args.quick, args.staleness, device=device)))
    if "targets" in sections:
        window = min(args.target_window, args.target_steps)
        print("\nIssue 12 targets")
        print(
            issue_targets(
                sets, device, args.target_block, args.target_frequency, args.target_steps, window
            )
        )


if __name__ == "__main__":
    main()
