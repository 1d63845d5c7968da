"""Optimizer step time of LARS, LAMB and ALTO next to torch and reference implementations.

Parameter sets: ResNet-50's 161 tensors (25.6M parameters: 53 convolutions, 53
batch norms, the classifier) and a transformer of ``--layers`` blocks of width
768 (12 blocks: 85M parameters in 146 tensors; no embeddings). Parameters are
split like :func:`largebatch.optim.param_groups` does (1-D tensors: no weight
decay, no trust ratio). Gradients are fixed random tensors, restored before every
step (some references clip or rescale ``p.grad`` in place) outside the timed
region; only ``optimizer.step()`` is timed (wall clock, synchronised on GPU).

Every contender steps the same parameter tensors. After warm-up steps, each
contender's steps alternate with fused AdamW's (which goes first in every other
round), one contender at a time, so machine load affects both sides of each
ratio alike and only one contender's state is in memory beside AdamW's.
Reported: the median step time, and the median over rounds of the ratio to
fused AdamW's step in the same round. The first step (state creation,
compilation for ``compiled`` paths) is reported separately.

Contenders come from section functions in :data:`SECTIONS`; another section (e.g.
Shampoo) is one more function returning :class:`Contender` records::

    SECTIONS.append(
        lambda settings: [Contender("shampoo", lambda groups: create_optimizer("shampoo", groups))]
    )

Our optimizers run on the paths of ``--paths``; by default foreach and compiled on CPU
(where foreach is the default path), and on CUDA the default path (the fused Triton
kernels where supported), foreach and compiled, followed by checks of the default step:
no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``) and CUDA-graph
capture. The targets (:data:`TARGETS`) are printed beside the ratios.

Run: ``python benchmarks/optimizer_step.py [--quick] [--threads N] [--device cpu|cuda] [--shampoo]``
(full: about 10 minutes on a quiet 2-core CPU; ``--quick``: a 4-block
transformer and fewer rounds, a few minutes).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from largebatch.optim import create_optimizer, list_optimizers

Shapes = list[tuple[int, ...]]
Groups = list[dict]


def resnet50_shapes() -> Shapes:
    """ResNet-50's parameter shapes (torchvision layout), 25,557,032 parameters."""
    shapes: Shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for index in range(blocks):
            out_channels = 4 * width
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if index == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return shapes + [(1000, 2048), (1000,)]


def transformer_shapes(layers: int, width: int = 768) -> Shapes:
    """Pre-norm transformer blocks (fused QKV, 4x MLP) and a final layer norm."""
    block = [
        (width,), (width,),  # attention layer norm
        (3 * width, width), (3 * width,),  # query, key, value
        (width, width), (width,),  # attention output
        (width,), (width,),  # MLP layer norm
        (4 * width, width), (4 * width,),  # MLP in
        (width, 4 * width), (width,),  # MLP out
    ]  # fmt: skip
    return block * layers + [(width,), (width,)]


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration to time.

    Attributes:
        name: row label.
        build: makes the optimizer from parameter groups (dicts with ``params``,
            ``weight_decay`` and ``trust_ratio``).
        target: the largest acceptable ratio to fused AdamW, if any.
    """

    name: str
    build: Callable[[Groups], torch.optim.Optimizer]
    target: float | None = None


def _registered(name: str) -> bool:
    return any(spec.name == name for spec in list_optimizers())


def _accepts(name: str, keyword: str) -> bool:
    spec = next(spec for spec in list_optimizers() if spec.name == name)
    return keyword in inspect.signature(spec.load()).parameters


@dataclass(frozen=True)
class Settings:
    """What the command line chose that sections may read."""

    paths: tuple[str, ...]
    device: torch.device


def baseline_contenders(settings: Settings) -> list[Contender]:
    """torch's fastest AdamW and momentum SGD (the yardsticks)."""
    return [
        Contender("torch AdamW (fused)", lambda g: torch.optim.AdamW(g, lr=1e-4, fused=True)),
        Contender(
            "torch SGD momentum (foreach)",
            lambda g: torch.optim.SGD(g, lr=1e-4, momentum=0.9, foreach=True),
        ),
    ]


TARGETS = {"lars": 1.5, "lamb": 2.0, "alto": 2.2}
"""Largest acceptable step time relative to fused AdamW: on CPU for the compiled path
(issue #2), on CUDA for the default arguments (issue #12)."""

PATHS = {
    "default": {},
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "compiled": {"compiled": True},
    "compiled+overwrite_grad": {"compiled": True, "overwrite_grad": True},
    "fused": {"fused": True},
}
"""Execution paths of our optimizers, by the ``--paths`` name (each where the optimizer takes its switches)."""
DEFAULT_PATHS = {
    "cpu": ("foreach", "compiled", "compiled+overwrite_grad"),  # the default is foreach
    "cuda": ("default", "foreach", "compiled"),
}
"""``--paths`` when not given, by device type."""


def default_path(device: torch.device) -> str:
    """The path our optimizers take with default arguments on ``device`` (float32 tensors)."""
    from largebatch.optim import _base

    tensors = [torch.zeros(4, device=device)]
    ((path, _),) = _base.group_paths(None, [[tensors, tensors, tensors]])
    return path.value


def largebatch_contenders(settings: Settings) -> list[Contender]:
    """Our layer-wise optimizers on the chosen paths (ALTO when registered)."""
    contenders = []
    for name, target in TARGETS.items():
        if not _registered(name):
            continue
        for path in settings.paths:
            switch = PATHS[path]
            if not all(_accepts(name, keyword) for keyword in switch):
                continue
            label = f"default: {default_path(settings.device)}" if path == "default" else path
            contenders.append(
                Contender(
                    f"largebatch {name} ({label})",
                    lambda g, name=name, switch=switch: create_optimizer(
                        name, g, lr=1e-4, **switch
                    ),
                    target,
                )
            )
    return contenders


def reference_contenders(settings: Settings) -> list[Contender]:
    """pytorch-optimizer's Lamb and LARS, e-optimizer-adaptor's ALTO (where installed)."""
    contenders = []
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        from pytorch_optimizer import LARS, Lamb

        contenders += [
            Contender("pytorch-optimizer LARS", lambda g: LARS(g, lr=1e-4, momentum=0.9)),
            Contender("pytorch-optimizer Lamb", lambda g: Lamb(g, lr=1e-4)),
        ]
    if importlib.util.find_spec("ALTO") is not None:
        from ALTO import ALTO

        contenders.append(
            Contender(
                "e-optimizer-adaptor ALTO",
                lambda g: ALTO(g, lr=1e-4, betas=(0.99, 0.9, 0.99), alp=-5.0, eps=1e-6),
            )
        )
    return contenders


SECTIONS: list[Callable[[Settings], list[Contender]]] = [
    baseline_contenders,
    largebatch_contenders,
    reference_contenders,
]
"""Functions returning contenders; their rows are printed in this order."""

BASELINE = "torch AdamW (fused)"


@dataclass
class Timing:
    """Measurements of one contender on one parameter set."""

    first_step_s: float
    step_s: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)
    """Fused AdamW's step in the same rounds, for the ratio."""

    @property
    def ratio(self) -> float:
        """Median over rounds of this step time over fused AdamW's."""
        return statistics.median(t / b for t, b in zip(self.step_s, self.baseline_s))


def make_parameters(
    shapes: Shapes, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters (small random values) and fixed gradients of the given shapes."""
    generator = torch.Generator().manual_seed(0)
    params = [
        (0.02 * torch.randn(shape, generator=generator)).to(device).requires_grad_()
        for shape in shapes
    ]
    grads = [(1e-3 * torch.randn(shape, generator=generator)).to(device) for shape in shapes]
    return params, grads


def parameter_groups(params: Sequence[torch.Tensor]) -> Groups:
    """Decayed, trust-ratio weights and exempt 1-D tensors, as ``param_groups`` splits a model."""
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    return [
        {"params": matrices, "weight_decay": 1e-4, "trust_ratio": True},
        {"params": vectors, "weight_decay": 0.0, "trust_ratio": False},
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu`` counts only this process's CPU time (all its threads): on a shared machine
with ``--threads 1`` it leaves out the time other processes hold the core."""


def time_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of one ``optimizer.step()`` after restoring the gradients (not timed)."""
    for param, grad in zip(params, grads):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            param.grad.copy_(grad)
    _synchronize(device)
    start = clock()
    optimizer.step()
    _synchronize(device)
    return clock() - start


def measure(
    contenders: Sequence[Contender],
    shapes: Shapes,
    *,
    device: torch.device,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Each contender's steps interleaved with fused AdamW's, one contender at a time.

    Only one contender's state exists beside AdamW's at any time, so the 85M-parameter
    transformer fits in a few GiB.
    """
    params, grads = make_parameters(shapes, device)

    def warmed_up(contender: Contender) -> tuple[torch.optim.Optimizer, float]:
        optimizer = contender.build(parameter_groups(params))  # fresh dicts: torch fills them in
        first = time_step(optimizer, params, grads, device, clock)
        for _ in range(warmup - 1):
            time_step(optimizer, params, grads, device, clock)
        return optimizer, first

    baseline_contender = next(c for c in contenders if c.name == BASELINE)
    baseline, baseline_first = warmed_up(baseline_contender)
    timings = {BASELINE: Timing(baseline_first)}
    for contender in contenders:
        if contender is baseline_contender:
            continue
        optimizer, first = warmed_up(contender)
        timing = timings[contender.name] = Timing(first)
        for index in range(rounds):
            pair = [(optimizer, timing.step_s), (baseline, timing.baseline_s)]
            for stepped, samples in pair[:: 1 if index % 2 else -1]:
                samples.append(time_step(stepped, params, grads, device, clock))
        timings[BASELINE].step_s += timing.baseline_s
        timings[BASELINE].baseline_s += timing.baseline_s
        del optimizer, pair
        gc.collect()
    return timings


def markdown_table(title: str, timings: dict[str, Timing], targets: dict[str, float | None]) -> str:
    """Rows: median step time, median ratio to fused AdamW, target, first step."""
    lines = [
        f"**{title}**",
        "",
        "| optimizer | median step (ms) | ratio to fused AdamW | target | first step (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, timing in timings.items():
        ratio = timing.ratio
        target = targets.get(name)
        verdict = "" if target is None else f"<= {target} {'met' if ratio <= target else 'MISSED'}"
        lines.append(
            f"| {name} | {1e3 * statistics.median(timing.step_s):.1f} | {ratio:.2f}x "
            f"| {verdict} | {timing.first_step_s:.2f} |"
        )
    return "\n".join(lines)


def cuda_checks(shapes: Shapes, device: torch.device) -> list[str]:
    """Host syncs and CUDA-graph capture of our optimizers' default step, one line each.

    Sync: two steps under ``torch.cuda.set_sync_debug_mode("error")`` after one warm-up
    step. Capture: three warm-up steps on a side stream, one step captured in a CUDA
    graph and replayed three times, against an eager twin taking the same steps.
    """
    lines = []
    for name in TARGETS:
        if not _registered(name):
            continue
        params, grads = make_parameters(shapes, device)
        optimizer = create_optimizer(name, parameter_groups(params), lr=1e-4)
        time_step(optimizer, params, grads, device)
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(2):
                optimizer.step()
            sync = "none"
        except RuntimeError as error:
            sync = f"FOUND ({_first_line(error)})"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        lines.append(
            f"- {name}: host syncs in step(): {sync}; CUDA graph: {_capture(name, shapes, device)}"
        )
        del optimizer, params, grads
        gc.collect()
    return lines


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


def _capture(name: str, shapes: Shapes, device: torch.device) -> str:
    """Capture one default step in a CUDA graph; the replays' deviation from eager steps."""
    twins = []
    for _ in range(2):
        params, grads = make_parameters(shapes, device)
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        twins.append((params, create_optimizer(name, parameter_groups(params), lr=1e-4)))
    (graph_params, graph_optimizer), (eager_params, eager_optimizer) = twins
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                graph_optimizer.step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_optimizer.step()
        for _ in range(3):
            graph.replay()
        for _ in range(3 + 3):  # the warm-up and the replays (capturing runs nothing)
            eager_optimizer.step()
        torch.cuda.synchronize(device)
    except Exception as error:  # report any failure to capture; the benchmark goes on
        return f"capture FAILED ({type(error).__name__}: {_first_line(error)})"
    deviation = max(((a - b).norm() / b.norm()).item() for a, b in zip(graph_params, eager_params))
    return f"captured; 3 replays deviate from eager steps by {deviation:.1e} (relative)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 transformer blocks, fewer rounds")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: torch's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 25, quick 7)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="transformer blocks (default 12, quick 4)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (CPU only)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="substrings of contender names to run"
    )
    parser.add_argument(
        "--paths",
        default=None,
        help=f"our optimizers' execution paths, comma-separated, from {sorted(PATHS)} "
        f"(default: {', '.join(f'{k}: {v}' for k, v in DEFAULT_PATHS.items())})",
    )
    parser.add_argument(
        "--shampoo",
        action="store_true",
        help="also run the Shampoo section (amortized over root windows; see shampoo_step.py)",
    )
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work; use --clock wall on an accelerator")
    rounds = args.rounds or (7 if args.quick else 25)
    layers = args.layers or (4 if args.quick else 12)
    warmup = 3

    paths = (
        tuple(args.paths.split(","))
        if args.paths
        else DEFAULT_PATHS.get(device.type, DEFAULT_PATHS["cpu"])
    )
    if unknown := sorted(set(paths) - set(PATHS)):
        parser.error(f"unknown path(s) {unknown}; choose from {sorted(PATHS)}")
    settings = Settings(paths=paths, device=device)
    contenders = [c for section in SECTIONS for c in section(settings)]
    if args.only:
        contenders = [
            c for c in contenders if c.name == BASELINE or any(s in c.name for s in args.only)
        ]
    targets = {c.name: c.target for c in contenders}
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{rounds} rounds after {warmup} warm-up steps, {args.clock} clock; "
        f"our default path here: {default_path(device)}\n"
    )
    parameter_sets = [
        ("ResNet-50", resnet50_shapes()),
        (f"Transformer, {layers} blocks of width 768", transformer_shapes(layers)),
    ]
    if len(contenders) == 1:  # --only matched nothing beside the baseline
        print(f"--only {' '.join(args.only)} matched no contender: step-time tables skipped\n")
        parameter_sets = []
    for title, shapes in parameter_sets:
        numel = sum(torch.Size(s).numel() for s in shapes)
        timings = measure(
            contenders,
            shapes,
            device=device,
            warmup=warmup,
            rounds=rounds,
            clock=CLOCKS[args.clock],
        )
        print(
            markdown_table(
                f"{title}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters", timings, targets
            )
        )
        print()

    if device.type == "cuda" and parameter_sets:
        print("**CUDA checks of the default step (ResNet-50 shapes)**\n")
        print("\n".join(cuda_checks(parameter_sets[0][1], device)))
        print()

    if args.shampoo:
        # Imported here: shampoo_step imports this module's parameter sets.
        from shampoo_step import format_rows, run_shampoo_benchmark

        # Its thread-CPU times count the stepping thread only: one intra-op thread.
        torch.set_num_threads(1)
        print("Shampoo (amortized over 2 x precondition_frequency steps, vs fused AdamW and")
        print("pytorch-optimizer ScalableShampoo at equal block size and root frequency;")
        print("1 intra-op thread, as benchmarks/shampoo_step.py)")
        print(format_rows(run_shampoo_benchmark(args.quick)))


if __name__ == "__main__":
    main()
