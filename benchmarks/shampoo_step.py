"""Shampoo's optimizer step time, next to fused AdamW and pytorch-optimizer's ScalableShampoo.

Parameter sets: those of ``optimizer_step.py``: ResNet-50's 161 tensors (25.6M parameters)
and a transformer of 4 blocks of width 768 (28.3M parameters in 50 tensors). Gradients are
fixed random tensors; only ``optimizer.step()`` is timed.

Every time is reported twice: wall clock, and the CPU time of the stepping thread
(``time.thread_time``). On a shared machine the wall clock mostly measures the neighbours'
load; thread CPU time measures our work, and the root thread's work is not in it. Variants
that are compared are stepped round-robin, so they see the same load; figures are medians.
``--threads`` sets the intra-op threads (default 1: the matrix-product rate is then one
core's, and the root thread can use another).

Per parameter set and block size (root frequency F = 100):

* floor: statistics FLOPs per step (``2 n_d numel(block)`` per block and dimension) over the
  float32 1024 x 1024 matrix-product rate measured in the same run (thread CPU time).
  Preconditioning costs the same FLOPs again, so a second floor counts both;
* Shampoo, once with float32 products (the default) and once with bfloat16 products
  (``matmul_dtype=torch.bfloat16``; statistics and roots stay float32):

  - statistics only: a step before ``start_preconditioning_step`` (grafted step);
  - roots disabled: a step that preconditions with fixed roots (between root computations);
  - async roots, amortized: one root cycle of F steps, i.e. the measured window from the
    snapshot to the install (``staleness + 1`` steps, roots computed on the background
    thread meanwhile) plus ``F - staleness - 1`` plain steps, over F. The plain steps are
    the median of 3 steps just before and 3 just after the window. Full mode also gives
    the synchronous amortized time (the root step measured);

* ScalableShampoo at the same block size and frequency: ``((F - 1) regular + root step) / F``
  (``scalable_*_vs_ours`` on each amortized row: its time over ours);
* fused AdamW.

Full mode also compares implementation choices on ResNet-50: float64 statistics and roots,
one block per bucket (no batching), one bucket per shape (no size cap), and coupled-Newton
against eigh roots.

Run: ``python benchmarks/shampoo_step.py [--quick] [--threads 1] [--staleness 10]``
(full: about 10 minutes on the shared 2-core machine; ``--quick``: block 256 only, staleness
5, about a minute). Even thread CPU times vary by up to ~30% between runs there.
``run_shampoo_benchmark(quick)`` returns the rows, for ``optimizer_step.py``.
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

from largebatch.optim.shampoo import CoupledNewtonConfig, RootConfig, Shampoo, preconditioner
from largebatch.optim.shampoo.blocking import plan_blocking

FREQUENCY = 100
TRANSFORMER_LAYERS = 4  # 28.3M parameters in 50 tensors: the full 12 would take many minutes
DISABLED = 10**9  # a frequency or start step that is never reached
Row = dict[str, object]
PARAM_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "transformer": lambda: transformer_shapes(TRANSFORMER_LAYERS),
}


class Timer:
    """Wall-clock and thread-CPU seconds of repeated calls; medians."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, run: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        run()
        self.cpu.append(time.thread_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    @property
    def median(self) -> tuple[float, float]:
        return statistics.median(self.wall), statistics.median(self.cpu)


def round_robin(
    runs: dict[str, Callable[[], object]], rounds: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of each run, the runs called in turn ``rounds`` times."""
    timers = {name: Timer() for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timers[name](run)
    return {name: timer.median for name, timer in timers.items()}


def matmul_gflops(size: int = 1024, repeats: int = 9) -> float:
    """float32 matrix-product rate, by thread CPU time."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    _, cpu = round_robin({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * size**3 / cpu / 1e9


def statistics_gflop(shapes: Shapes, block: int) -> float:
    """FLOPs of one step's statistics products ``G_(d) G_(d)^T`` (the same again to precondition)."""
    total = 0
    for shape in shapes:
        for b in plan_blocking("p", shape, block, 8192).blocks:
            total += sum(2 * n * b.numel for n in b.shape)
    return total / 1e9


def parameters_with_grads(shapes: Shapes) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        param.grad = 1e-3 * torch.randn(shape, generator=generator)
        params.append(param)
    return params


def set_groups(optimizer: torch.optim.Optimizer, **settings: object) -> Callable[[], None]:
    """A step after setting hyperparameters (as a schedule would)."""

    def run() -> None:
        for group in optimizer.param_groups:
            group.update(settings)
        optimizer.step()

    return run


def shampoo(shapes: Shapes, block: int, **options: object) -> Shampoo:
    """Shampoo preconditioning from step 1, roots never due until a window asks for them."""
    settings = dict(
        max_preconditioner_dim=block, precondition_frequency=DISABLED, start_preconditioning_step=1
    )
    optimizer = Shampoo(parameters_with_grads(shapes), **{**settings, **options})
    optimizer.step()  # first touch of every buffer
    return optimizer


def root_window(optimizer: Shampoo, staleness: int) -> Timer:
    """Time the steps from the statistics snapshot to the roots' install (one step when synchronous)."""
    timer = Timer()
    step = int(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"])
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
    optimizer: Shampoo, plain: tuple[float, float], staleness: int
) -> tuple[tuple[float, float], tuple[float, float], Timer]:
    """(amortized cycle, plain step around the window, the window) of one async root cycle."""
    before = round_robin({"plain": optimizer.step}, 3)["plain"]
    window = root_window(optimizer, staleness)
    after = round_robin({"plain": optimizer.step}, 3)["plain"]
    around = tuple(statistics.median(pair) for pair in zip(before, after, plain))
    return amortized(window, around, staleness), around, window


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
"""Shampoo's ``matmul_dtype`` variants, by row label."""


def benchmark_set(
    param_set: str, shapes: Shapes, block: int, rounds: int, staleness: int, full: bool
) -> list[Row]:
    rate = matmul_gflops()
    gflop = statistics_gflop(shapes, block)
    floor = gflop / rate
    ours = {
        label: shampoo(shapes, block, staleness=staleness, matmul_dtype=dtype)
        for label, dtype in PRECISIONS.items()
    }
    theirs = ScalableShampoo(
        parameters_with_grads(shapes), lr=1e-3, block_size=block,
        preconditioning_compute_steps=FREQUENCY, start_preconditioning_step=1,
    )  # fmt: skip
    theirs.step()
    adamw = torch.optim.AdamW(parameters_with_grads(shapes), lr=1e-3, fused=True)
    adamw.step()
    runs = {}
    for label, optimizer in ours.items():
        runs[f"{label} statistics only"] = set_groups(
            optimizer, start_preconditioning_step=DISABLED
        )
        runs[f"{label} roots disabled"] = set_groups(optimizer, start_preconditioning_step=1)
    steps = round_robin({**runs, "scalable": theirs.step, "adamw": adamw.step}, rounds)

    theirs.preconditioning_compute_steps = theirs.param_groups[0]["step"] + 1
    root_step = Timer()
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
        cycle, around, window = async_cycle(optimizer, plain, staleness)
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
        synchronous = root_window(shampoo(shapes, block, staleness=0, asynchronous=False), 0)
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


def implementation_choices(shapes: Shapes, rounds: int) -> list[Row]:
    """Each implementation choice against its alternative, stepped round-robin on ResNet-50."""
    rows = []
    for block in (1024, 256):
        variants = {
            "default": shampoo(shapes, block),
            "float64": shampoo(shapes, block, factor_dtype=torch.float64),
        }
        for name, cap in (("unbatched", 1), ("uncapped", 2**40)):
            with bucket_cap(cap):
                variants[name] = shampoo(shapes, block)
        times = round_robin({name: optimizer.step for name, optimizer in variants.items()}, rounds)
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
        optimizer = shampoo(shapes, 256, staleness=0, asynchronous=False, roots=config)
        roots[name] = root_window(optimizer, 0)
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
    quick: bool, staleness: int | None = None, param_sets: dict[str, Shapes] | None = None
) -> list[Row]:
    """All rows: per parameter set and block size (256 only when quick; 1024 and 256 otherwise)."""
    sets = param_sets or {name: make() for name, make in PARAM_SETS.items()}
    staleness = staleness or (5 if quick else 10)
    rounds = 3 if quick else 5
    blocks = [256] if quick else [1024, 256]
    rows = [
        r
        for name, shapes in sets.items()
        for block in blocks
        for r in benchmark_set(name, shapes, block, rounds, staleness, full=not quick)
    ]
    if not quick and param_sets is None:
        rows += implementation_choices(sets["resnet50"], rounds)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="block 256 only, staleness 5, 3 rounds"
    )
    parser.add_argument(
        "--staleness", type=int, default=None, help="root window length (default 10; quick 5)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); medians of wall-clock and thread-CPU seconds"
    )
    print(format_rows(run_shampoo_benchmark(args.quick, args.staleness)))


if __name__ == "__main__":
    main()
