"""Shampoo's optimizer step time, next to fused AdamW and pytorch-optimizer's ScalableShampoo.

Parameter sets: ResNet-50's 161 tensors (25.6M parameters) and a transformer (6 layers,
width 512, 32k vocabulary; the embedding exceeds ``max_preconditioned_dim`` and gets the
grafted step only). Gradients are fixed random tensors; only ``optimizer.step()`` is timed
(wall clock, ``time.perf_counter``), with ``--threads`` intra-op threads (default 1: the
machine's matrix-product rate is then one core's, and the root thread can use another).

Measured per parameter set and block size (root frequency F = 100):

* the floor: statistics FLOPs per step (``2 n_d numel(block)`` per block and dimension)
  divided by the matrix-product rate measured in the same run (1024 x 1024 float32);
  preconditioning ``X x_d R_d`` costs the same FLOPs again, so a second floor counts both;
* Shampoo steps: statistics only (before ``start_preconditioning_step``); roots disabled
  (preconditioning with fixed roots, the step between root computations; median of plain
  steps); amortized with asynchronous roots: one root cycle of F steps, i.e. the measured
  window from the snapshot to the install (``staleness + 1`` steps, the roots computed on the
  background thread meanwhile) plus ``F - staleness - 1`` plain steps, divided by F;
  in full mode also amortized with synchronous roots (the root step measured);
* ScalableShampoo at the same block size and frequency: ``((F - 1) * regular + root step) / F``
  with its regular step (median) and its root step measured;
* fused AdamW.

Full mode also measures the implementation choices on ResNet-50 at block 1024: float64
statistics and roots, blocks of one shape not batched, one bucket per shape (no 16 MiB
cap), and coupled-Newton against eigh roots. ``--literal`` instead times 2F consecutive
steps of Shampoo with asynchronous roots (slow: minutes per configuration).

Run: ``python benchmarks/shampoo_step.py [--quick] [--threads 1] [--literal]``
(full: a few minutes on an idle core; ``--quick``: block 256 only, staleness 5 instead of
the default 25, under a minute).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from pytorch_optimizer import ScalableShampoo

from largebatch.optim.shampoo import CoupledNewtonConfig, RootConfig, Shampoo, preconditioner
from largebatch.optim.shampoo.blocking import plan_blocking

FREQUENCY = 100
Shapes = list[tuple[int, ...]]
Row = dict[str, object]


def resnet50_shapes() -> Shapes:
    """ResNet-50's parameter shapes: 53 convolutions, 53 batch norms (weight, bias), the classifier."""
    shapes: Shapes = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for index in range(blocks):
            shapes += [
                (width, channels, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
            ]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if index == 0:
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def transformer_shapes(
    layers: int = 6, width: int = 512, vocabulary: int = 32000, context: int = 1024
) -> Shapes:
    """A GPT-style decoder: token and position embeddings, attention and MLP blocks, layer norms."""
    shapes: Shapes = [(vocabulary, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [
            (width,),
            (width,),
            (4 * width, width),
            (4 * width,),
            (width, 4 * width),
            (width,),
        ]
    return shapes + [(width,), (width,)]


PARAM_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "transformer": transformer_shapes,
}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(size: int = 1024, repeats: int = 9) -> float:
    """Measured float32 matrix-product rate."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats) / 1e9


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


def set_group(optimizer: torch.optim.Optimizer, **settings: object) -> None:
    for group in optimizer.param_groups:
        group.update(settings)


def shampoo_cycle(
    shapes: Shapes, block: int, plain_steps: int, **options: object
) -> dict[str, float]:
    """Shampoo's plain step, statistics-only step and one root cycle (see the module docstring).

    The frequency is lowered for one step so that the cycle starts at once (a
    hyperparameter change, as a schedule would make), then restored to F.
    """
    params = parameters_with_grads(shapes)
    optimizer = Shampoo(
        params, max_preconditioner_dim=block, precondition_frequency=FREQUENCY, **options
    )
    staleness = optimizer.param_groups[0]["staleness"]
    optimizer.step()  # first touch of every buffer
    statistics_only = median_seconds(
        optimizer.step, plain_steps
    )  # before start_preconditioning_step
    set_group(optimizer, start_preconditioning_step=1)
    plain = median_seconds(optimizer.step, plain_steps)

    set_group(optimizer, precondition_frequency=int(optimizer.state[params[0]]["step"]) + 1)
    start = time.perf_counter()
    optimizer.step()  # snapshot (and, when staleness is 0, the roots)
    set_group(optimizer, precondition_frequency=FREQUENCY)
    for _ in range(staleness):
        optimizer.step()  # the last one installs the roots
    window = time.perf_counter() - start
    assert optimizer.root_staleness == staleness and optimizer.root_failure_count == 0
    amortized = (window + (FREQUENCY - staleness - 1) * plain) / FREQUENCY
    return {
        "statistics_only": statistics_only,
        "plain": plain,
        "window": window,
        "amortized": amortized,
        "staleness": staleness,
    }


def shampoo_literal(shapes: Shapes, block: int) -> float:
    """Mean step time over 2F consecutive steps with asynchronous roots, after F warm-up steps."""
    params = parameters_with_grads(shapes)
    optimizer = Shampoo(
        params,
        max_preconditioner_dim=block,
        precondition_frequency=FREQUENCY,
        start_preconditioning_step=1,
    )
    for _ in range(FREQUENCY):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(2 * FREQUENCY):
        optimizer.step()
    return (time.perf_counter() - start) / (2 * FREQUENCY)


def scalable_shampoo(shapes: Shapes, block: int, regular_steps: int) -> dict[str, float]:
    """pytorch-optimizer's ScalableShampoo: regular step, root step, amortized over F."""
    optimizer = ScalableShampoo(
        parameters_with_grads(shapes),
        lr=1e-3,
        block_size=block,
        preconditioning_compute_steps=FREQUENCY,
        start_preconditioning_step=1,
    )
    optimizer.step()
    regular = median_seconds(optimizer.step, regular_steps)
    optimizer.preconditioning_compute_steps = optimizer.param_groups[0]["step"] + 1
    root_step = median_seconds(optimizer.step, 1)
    return {
        "regular": regular,
        "root_step": root_step,
        "amortized": ((FREQUENCY - 1) * regular + root_step) / FREQUENCY,
    }


def fused_adamw(shapes: Shapes, steps: int) -> float:
    optimizer = torch.optim.AdamW(parameters_with_grads(shapes), lr=1e-3, fused=True)
    optimizer.step()
    return median_seconds(optimizer.step, steps)


@contextmanager
def bucket_cap(numel: int):
    saved = preconditioner.MAX_BUCKET_NUMEL
    preconditioner.MAX_BUCKET_NUMEL = numel
    try:
        yield
    finally:
        preconditioner.MAX_BUCKET_NUMEL = saved


def batched_against_per_block(shapes: Shapes, block: int, repeats: int) -> tuple[float, float]:
    """Statistics + preconditioning kernels: same-shape blocks stacked, against one block at a time."""
    stacks: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for shape in shapes:
        for b in plan_blocking("p", shape, block, 8192).blocks:
            stacks.setdefault(b.shape, []).append(torch.randn(b.shape))
    batched = [torch.stack(blocks) for blocks in stacks.values()]
    single = [block.unsqueeze(0) for blocks in stacks.values() for block in blocks]

    def kernels(units: Sequence[torch.Tensor]) -> Callable[[], None]:
        state = [([torch.eye(n).repeat(len(u), 1, 1) for n in u.shape[1:]], u) for u in units]

        def run() -> None:
            for factors, grads in state:
                preconditioner.accumulate_statistics(factors, grads, 1.0)
                preconditioner.precondition(factors, grads)

        return run

    return median_seconds(kernels(batched), repeats), median_seconds(kernels(single), repeats)


def root_seconds(shapes: Shapes, block: int, roots: RootConfig) -> float:
    """Time of one synchronous computation of every root (the statistics of 3 steps)."""
    optimizer = Shampoo(
        parameters_with_grads(shapes), max_preconditioner_dim=block, precondition_frequency=3,
        staleness=0, asynchronous=False, roots=roots,
    )  # fmt: skip
    optimizer.step()
    optimizer.step()
    return median_seconds(optimizer.step, 1)


def row(
    param_set: str, shapes: Shapes, block: int, variant: str, seconds: float, **extra: object
) -> Row:
    return {
        "param_set": param_set,
        "params_m": round(sum(torch.Size(s).numel() for s in shapes) / 1e6, 1),
        "tensors": len(shapes),
        "block": block,
        "frequency": FREQUENCY,
        "variant": variant,
        "seconds": seconds,
        **extra,
    }


def benchmark_set(
    param_set: str, shapes: Shapes, block: int, quick: bool, literal: bool
) -> list[Row]:
    repeats = 3 if quick else 5
    rate = matmul_gflops()
    gflop = statistics_gflop(shapes, block)
    floor = gflop / rate
    rows = [
        row(
            param_set,
            shapes,
            block,
            "floor: statistics products",
            floor,
            gflop=round(gflop, 1),
            gflops=round(rate),
        ),
        row(
            param_set,
            shapes,
            block,
            "floor: statistics + preconditioning",
            2 * floor,
            gflop=round(2 * gflop, 1),
        ),
    ]
    # Quick mode shortens the root window: staleness 5 instead of the default F // 4 = 25.
    ours = shampoo_cycle(shapes, block, repeats, **({"staleness": 5} if quick else {}))
    rows += [
        row(param_set, shapes, block, "shampoo: statistics only (grafted step)", ours["statistics_only"], vs_floor=ours["statistics_only"] / floor),
        row(param_set, shapes, block, "shampoo: roots disabled", ours["plain"], vs_floor=ours["plain"] / floor),
        row(
            param_set, shapes, block, "shampoo: async roots, amortized", ours["amortized"],
            vs_roots_disabled=ours["amortized"] / ours["plain"],
            window=f"{ours['window']:.2f}s over {ours['staleness'] + 1} steps",
        ),
    ]  # fmt: skip
    if literal:
        mean = shampoo_literal(shapes, block)
        rows.append(
            row(
                param_set,
                shapes,
                block,
                "shampoo: async roots, 2F consecutive steps",
                mean,
                vs_roots_disabled=mean / ours["plain"],
            )
        )
    if not quick:
        sync = shampoo_cycle(shapes, block, repeats, staleness=0, asynchronous=False)
        rows.append(
            row(
                param_set,
                shapes,
                block,
                "shampoo: sync roots, amortized",
                sync["amortized"],
                root_step=round(sync["window"], 2),
            )
        )
    gc.collect()
    theirs = scalable_shampoo(shapes, block, repeats)
    rows.append(
        row(
            param_set, shapes, block, "ScalableShampoo (pytorch-optimizer), amortized", theirs["amortized"],
            regular_step=round(theirs["regular"], 3), root_step=round(theirs["root_step"], 2),
            vs_ours=theirs["amortized"] / ours["amortized"],
        )
    )  # fmt: skip
    rows.append(row(param_set, shapes, block, "AdamW (fused)", fused_adamw(shapes, repeats)))
    gc.collect()
    return rows


def implementation_choices(shapes: Shapes, block: int) -> list[Row]:
    """Each implementation choice against its alternative, on one parameter set."""
    name = "resnet50"
    default = shampoo_cycle(shapes, block, 3)["plain"]
    float64 = shampoo_cycle(shapes, block, 3, factor_dtype=torch.float64)["plain"]
    with bucket_cap(2**40):
        uncapped = shampoo_cycle(shapes, block, 3)["plain"]
    batched, per_block = batched_against_per_block(shapes, block, 3)
    eigh = root_seconds(shapes, block, RootConfig())
    newton = root_seconds(shapes, block, RootConfig(method=CoupledNewtonConfig()))
    return [
        row(
            name,
            shapes,
            block,
            "choice: float32 statistics/roots (default), roots disabled",
            default,
        ),
        row(
            name,
            shapes,
            block,
            "choice: float64 statistics/roots, roots disabled",
            float64,
            vs_default=float64 / default,
        ),
        row(
            name,
            shapes,
            block,
            "choice: one bucket per shape (no 16 MiB cap), roots disabled",
            uncapped,
            vs_default=uncapped / default,
        ),
        row(
            name,
            shapes,
            block,
            "choice: same-shape blocks batched (default), kernels only",
            batched,
        ),
        row(
            name,
            shapes,
            block,
            "choice: one block at a time, kernels only",
            per_block,
            vs_default=per_block / batched,
        ),
        row(name, shapes, block, "choice: eigh roots (default), all roots once", eigh),
        row(
            name,
            shapes,
            block,
            "choice: coupled Newton roots, all roots once",
            newton,
            vs_default=newton / eigh,
        ),
    ]


def run_shampoo_benchmark(
    quick: bool, literal: bool = False, param_sets: dict[str, Shapes] | None = None
) -> list[Row]:
    """All rows: per parameter set and block size (256 only when quick; 1024 and 256 otherwise)."""
    sets = param_sets or {name: make() for name, make in PARAM_SETS.items()}
    blocks = [256] if quick else [1024, 256]
    rows = [
        row
        for name, shapes in sets.items()
        for block in blocks
        for row in benchmark_set(name, shapes, block, quick, literal)
    ]
    if not quick and param_sets is None:
        rows += implementation_choices(sets["resnet50"], 1024)
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        extra = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k
            not in ("param_set", "params_m", "tensors", "block", "frequency", "variant", "seconds")
        )
        lines.append(
            f"{r['param_set']:<11} {r['params_m']:>5}M/{r['tensors']:<3} block {r['block']:<4} {r['variant']:<62} {r['seconds']:8.3f} s  {extra}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="block 256 only, fewer repeats")
    parser.add_argument(
        "--literal", action="store_true", help="also time 2F consecutive async steps"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); seconds are medians of wall-clock step times"
    )
    print(format_rows(run_shampoo_benchmark(args.quick, args.literal)))


if __name__ == "__main__":
    main()
