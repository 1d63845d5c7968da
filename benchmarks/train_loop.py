"""Speed of the training loop, on the CPU or a GPU.

1. Per-step overhead of ``largebatch.train.train`` against a bare PyTorch loop of
   the same model, optimizer (SGD + momentum), learning-rate schedule and data
   (shuffle per epoch, index the batch on the device, forward, backward, ``step``,
   ``LambdaLR.step``; no host reads). Each loop runs ``--steps`` and ``3 x --steps``
   steps; the time difference divided by the step difference is the cost of one
   step, free of set-up, evaluation and checkpoint costs. The two loops alternate
   over the repeats. On the CPU the time is this process's CPU time with one
   thread, which other processes on a shared machine disturb far less than wall
   time; on a GPU it is wall time, the device synchronised at both ends. Targets:
   <= 1.10x on the CPU, <= 1.20x on a GPU. Cases: ``--cases TASK:BATCH ...``
   (default mnist1d-cnn at 64 and 256, modadd-transformer at 256).
2. Cost of logging the gradient noise scale: the same per-step time of ``train``
   with ``accumulation_steps=2`` (where it is measured for free), with
   ``noise_scale`` off and on (measured every ``--noise-every`` steps). Reported,
   to be read against the budget of (1).
3. Examples per second (wall clock) of 1 vs 2 gloo processes
   (``largebatch run --nproc``), from the ``wall_time`` in ``result.json`` of runs
   of two lengths, as above. CPU only; reported, no target.
4. Start-up (``--startup``), each in fresh processes, medians of ``--repeats``:
   ``largebatch --help`` (wall time, and whether it imported torch); the phases of
   a one-process run up to the end of its first step (interpreter and imports,
   task data, device initialisation, set-up, first evaluation, first step);
   ``largebatch run`` of one step against one of ``1 + --steps`` steps (whose
   difference is training, the rest start-up); and, on the CPU, a one-step
   2-process run against torchrun starting the same worker module.

Run: ``python benchmarks/train_loop.py [--device cpu|cuda] [--cases mnist1d-cnn:64 ...]
[--steps 400] [--repeats 7] [--noise-every 1 10] [--skip-overhead] [--skip-noise]
[--skip-ddp] [--startup] [--quick]``.
``--quick`` (for ``gpu_check.sh``): 200 steps, 3 repeats, mnist1d-cnn:64 and
modadd-transformer:256, the overhead section only unless others are named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from largebatch.optim import create_optimizer
from largebatch.tasks import get_task
from largebatch.train import RunConfig, train
from largebatch.train.schedules import WarmupThenDecay, build_scheduler

OPTIMIZER = {"momentum": 0.9}
LR = 0.1
TARGETS = {"cpu": 1.10, "cuda": 1.20}
DEFAULT_CASES = ["mnist1d-cnn:64", "mnist1d-cnn:256", "modadd-transformer:256"]
QUICK_CASES = ["mnist1d-cnn:64", "modadd-transformer:256"]


class Clock:
    """CPU time of this process on the CPU; wall time between device synchronisations on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


def bare_loop_seconds(task_name: str, device: torch.device, steps: int, batch_size: int) -> float:
    """Time of ``steps`` SGD steps written as plainly as PyTorch allows, data on ``device``."""
    torch.manual_seed(0)
    task = get_task(task_name)
    inputs, targets = (t.to(device) for t in task.train.tensors)
    model = task.build_model().to(device)
    optimizer = create_optimizer("sgd", model, lr=LR, **OPTIMIZER)
    scheduler = build_scheduler(optimizer, WarmupThenDecay(steps, 0, "cosine"))
    per_epoch = len(inputs) // batch_size
    clock = Clock(device)
    start = clock()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(inputs)).to(device, non_blocking=True)
        rows = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(inputs[rows]), targets[rows])
        loss.backward()
        optimizer.step()
        scheduler.step()
    return clock() - start


def our_loop_seconds(
    task_name: str, device: torch.device, steps: int, batch_size: int, **settings
) -> float:
    """Time of ``train`` for ``steps`` steps (evaluations only at start and end).

    ``settings`` are further ``RunConfig`` fields (accumulation, noise scale).
    """
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(
            task=task_name, optimizer="sgd", optimizer_options=OPTIMIZER, lr=LR,
            batch_size=batch_size, warmup_steps=0, steps=steps, eval_every=steps, out_dir=out,
            device=str(device), **settings,
        )  # fmt: skip
        clock = Clock(device)
        start = clock()
        train(config)
        return clock() - start


def per_step(measure: Callable[[int, int], float], steps: int, batch_size: int) -> float:
    """(time of 3 x steps - time of steps) / (2 x steps): one step's cost, in seconds."""
    return (measure(3 * steps, batch_size) - measure(steps, batch_size)) / (2 * steps)


def loop_overhead(cases: list[str], device: torch.device, steps: int, repeats: int) -> None:
    target = TARGETS[device.type]
    clock = "wall time" if device.type == "cuda" else "CPU time, 1 thread"
    print(f"Time per step, SGD+momentum, {device}, {clock} (median of {repeats}, alternating)")
    print("| task | batch | bare PyTorch | largebatch | ratio | target | repeats |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        task_name, batch_size = case.rsplit(":", 1)
        bare_loop = partial(bare_loop_seconds, task_name, device)
        our_loop = partial(our_loop_seconds, task_name, device)
        for warm_up in (bare_loop, our_loop):  # caches, kernels, the allocator
            warm_up(8, int(batch_size))
        bare, ours = [], []
        for _ in range(repeats):
            bare.append(per_step(bare_loop, steps, int(batch_size)))
            ours.append(per_step(our_loop, steps, int(batch_size)))
        ratios = [o / b for o, b in zip(ours, bare)]
        ratio = statistics.median(ratios)
        print(
            f"| {task_name} | {batch_size} | {statistics.median(bare) * 1e3:.3f} ms"
            f" | {statistics.median(ours) * 1e3:.3f} ms | {ratio:.2f}x"
            f" | <= {target:.2f}x {'met' if ratio <= target else 'MISSED'}"
            f" | {min(ratios):.2f}x to {max(ratios):.2f}x |"
        )


def noise_scale_cost(
    task_name: str, device: torch.device, batch_sizes: list[int], every: list[int], steps: int,
    repeats: int,
) -> None:  # fmt: skip
    print(f"\nNoise-scale logging, {task_name}, accumulation_steps=2 (median of {repeats})")
    settings = {"off": {"noise_scale": False}}
    settings.update({f"every {n}": {"noise_scale": True, "noise_scale_every": n} for n in every})
    for batch_size in batch_sizes:
        times = {name: [] for name in settings}
        for _ in range(repeats):
            for name, fields in settings.items():
                measure = partial(
                    our_loop_seconds, task_name, device, accumulation_steps=2, **fields
                )
                times[name].append(per_step(measure, steps, batch_size))
        parts = [f"off {statistics.median(times['off']) * 1e3:.3f} ms"]
        for name in list(settings)[1:]:
            overheads = [t / o - 1 for t, o in zip(times[name], times["off"])]
            parts.append(
                f"{name} {statistics.median(times[name]) * 1e3:.3f} ms"
                f" ({statistics.median(overheads):+.1%},"
                f" repeats {min(overheads):+.1%} to {max(overheads):+.1%})"
            )
        print(f"  batch {batch_size:>5}: " + ", ".join(parts))


def cli_command(task_name: str, out: str, *options: str) -> list[str]:
    """``python -m largebatch run`` on ``task_name`` with SGD, no warm-up, no progress bar."""
    return [
        sys.executable, "-m", "largebatch", "run", "--task", task_name, "--optimizer", "sgd",
        "--lr", str(LR), "--warmup", "0", "--no-progress", "--out", out, *options,
    ]  # fmt: skip


def cli_examples_per_second(
    task_name: str, nproc: int, threads: int, steps: int, batch_size: int
) -> float:
    """Examples/s of ``largebatch run --nproc`` from the step-count difference of two runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    times = []
    for n in (steps, 3 * steps):
        with tempfile.TemporaryDirectory() as out:
            command = cli_command(
                task_name, out, "--batch-size", str(batch_size), "--steps", str(n),
                "--eval-every", str(n), "--nproc", str(nproc), "--device", "cpu",
            )  # fmt: skip
            subprocess.run(command, env=env, check=True, capture_output=True)
            times.append(json.loads((Path(out) / "result.json").read_text())["wall_time"])
    return 2 * steps * batch_size / (times[1] - times[0])


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def two_process_startup_seconds(task_name: str, launcher: str) -> tuple[float, float]:
    """(CPU, wall) seconds of a one-step 2-process run started by ``launcher``."""
    with tempfile.TemporaryDirectory() as root:
        config = RunConfig(
            task=task_name, optimizer="sgd", lr=LR, batch_size=64, steps=1, warmup_steps=0,
            eval_every=1, nproc=2, device="cpu", out_dir=str(Path(root) / "run"),
        )  # fmt: skip
        if launcher == "largebatch":
            command = [sys.executable, "-m", "largebatch", "run", "--config", "CONFIG",
                       "--no-progress"]  # fmt: skip
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", "-m", "largebatch.train.worker", "CONFIG"]  # fmt: skip
        path = Path(root) / "config.json"
        path.write_text(json.dumps({"config": config.to_dict()}))
        command[command.index("CONFIG")] = str(path)
        cpu, wall = children_cpu_seconds(), time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return children_cpu_seconds() - cpu, time.perf_counter() - wall


PHASES = ("imports", "task data", "device init", "set-up", "first evaluation", "first step")


def startup_probe(task_name: str, device_name: str, batch_size: int) -> None:
    """(In a fresh process.) Print, as JSON, the seconds each phase before the first step took.

    ``imports`` counts from the process's creation: the interpreter's start and
    every import that ``largebatch run`` does. Each phase is ``[wall, CPU]`` seconds.
    """
    import largebatch.cli.run  # noqa: F401  (what `largebatch run` imports)
    from largebatch.train import loop

    marks = {"imports": clocks()}
    task = get_task(task_name)
    marks["task data"] = clocks()
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    marks["device init"] = clocks()
    evaluate, step = loop.evaluate_splits, loop.optimizer_step

    def first_evaluation(*args, **kwargs):
        marks.setdefault("set-up", clocks())
        metrics = evaluate(*args, **kwargs)
        marks.setdefault("first evaluation", clocks())
        return metrics

    def first_step(*args, **kwargs):
        outcome = step(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.setdefault("first step", clocks())
        return outcome

    loop.evaluate_splits, loop.optimizer_step = first_evaluation, first_step
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(
            task=task_name, optimizer="sgd", lr=LR, batch_size=batch_size, steps=1,
            warmup_steps=0, device=device_name, out_dir=out,
        )  # fmt: skip
        train(config, task=task)
    seconds, previous = {}, (process_start_time(), 0.0)
    for phase in PHASES:
        seconds[phase] = [now - before for now, before in zip(marks[phase], previous)]
        previous = marks[phase]
    print(json.dumps(seconds))


def clocks() -> tuple[float, float]:
    """(wall, CPU time of this process) now."""
    return time.time(), time.process_time()


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc; now where that is unreadable."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def startup(task_name: str, device: torch.device, batch_size: int, steps: int, repeats: int):
    """Print the start-up measurements (benchmark 4): wall and CPU seconds of fresh processes.

    CPU times are of one-thread processes (``OMP_NUM_THREADS=1``) on the CPU; with
    more threads, waiting threads spin and count.
    """
    print(f"\nStart-up, {task_name}, batch {batch_size}, {device} (median of {repeats})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device.type == "cpu" else None

    def timed(command: list[str]) -> tuple[float, float, str]:
        cpu, wall = children_cpu_seconds(), time.perf_counter()
        done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        return time.perf_counter() - wall, children_cpu_seconds() - cpu, done.stdout + done.stderr

    def row(what: str, measured: list[tuple[float, float]]) -> None:
        wall, cpu = (statistics.median(m[i] for m in measured) for i in (0, 1))
        print(f"| {what} | {wall:.2f} s | {cpu:.2f} s |")

    print("| what | wall | CPU |")
    print("| --- | --- | --- |")
    code = (
        "import sys; from largebatch.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "print('imports torch:', 'torch' in sys.modules)"
    )
    helps = [timed([sys.executable, "-c", code]) for _ in range(repeats)]
    row(f"`largebatch --help` ({helps[-1][2].strip().splitlines()[-1]})", helps)

    probe = [sys.executable, __file__, "--probe", task_name, str(device), str(batch_size)]
    phases = [json.loads(timed(probe)[2].splitlines()[-1]) for _ in range(repeats)]
    for phase in PHASES:
        row(f"first step of one process: {phase}", [run[phase] for run in phases])
    totals = [[sum(run[p][i] for p in PHASES) for i in (0, 1)] for run in phases]
    row("first step of one process: total", totals)

    runs = {1: [], 1 + steps: []}
    for _ in range(repeats):
        for n, measured in runs.items():
            with tempfile.TemporaryDirectory() as out:
                command = cli_command(
                    task_name, out, "--batch-size", str(batch_size), "--steps", str(n),
                    "--eval-every", str(n), "--device", str(device),
                )  # fmt: skip
                measured.append(timed(command)[:2])
    for n, measured in runs.items():
        row(f"`largebatch run --steps {n}`", measured)
    (one_wall, one_cpu), (more_wall, more_cpu) = (
        [statistics.median(m[i] for m in measured) for i in (0, 1)] for measured in runs.values()
    )
    clock = "CPU" if device.type == "cpu" else "wall"
    one, more = (one_cpu, more_cpu) if device.type == "cpu" else (one_wall, more_wall)
    step = (more - one) / steps
    print(
        f"\nStart-up of `largebatch run` ({clock}): {one - step:.2f} s, the time of"
        f" {(one - step) / step:,.0f} training steps ({step * 1e3:.2f} ms each)"
    )

    if device.type != "cpu":
        return
    times = {"largebatch": [], "torchrun": []}
    for _ in range(repeats):
        for launcher, measured in times.items():
            measured.append(two_process_startup_seconds(task_name, launcher))
    for launcher, measured in times.items():
        cpu, wall = (statistics.median(m[i] for m in measured) for i in (0, 1))
        print(f"  2 processes, {launcher:>10}: CPU {cpu:.2f} s (all processes), wall {wall:.2f} s")


def main() -> None:
    if sys.argv[1:2] == ["--probe"]:
        startup_probe(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--cases", nargs="+", default=None, metavar="TASK:BATCH")
    parser.add_argument("--steps", type=int, default=None, help="default 400, quick 200")
    parser.add_argument("--repeats", type=int, default=None, help="default 7, quick 3")
    parser.add_argument("--noise-every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--skip-overhead", action="store_true", help="skip benchmark 1")
    parser.add_argument("--skip-noise", action="store_true", help="skip benchmark 2")
    parser.add_argument("--skip-ddp", action="store_true", help="skip benchmark 3")
    parser.add_argument("--startup", action="store_true", help="also benchmark 4")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    for case in cases:
        task_name, _, batch = case.rpartition(":")
        if not (task_name and batch.isdigit()):
            parser.error(f"--cases {case!r}: expected TASK:BATCH, e.g. mnist1d-cnn:64")
        get_task(task_name)  # generate and cache the data outside the timings
    steps = args.steps or (200 if args.quick else 400)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, device {device}", end="")
    if device.type == "cuda":
        print(f" ({torch.cuda.get_device_name(device)})", end="")
    print(f", {time.strftime('%Y-%m-%d %H:%M')}\n")

    if not args.skip_overhead:
        loop_overhead(cases, device, steps, repeats)
    first_task, first_batch = cases[0].rsplit(":", 1)
    if not (args.skip_noise or args.quick):
        batch_sizes = sorted({int(c.rsplit(":", 1)[1]) for c in cases if c.startswith(first_task)})
        noise_scale_cost(first_task, device, batch_sizes, args.noise_every, steps, repeats)
    if not (args.skip_ddp or args.quick or device.type != "cpu"):
        batch_size = int(cases[-1].rsplit(":", 1)[1])
        print(f"\nExamples/s, largebatch run {first_task}, batch {batch_size} (gloo, this machine)")
        for nproc, threads in ((1, 1), (1, 2), (2, 1)):
            rate = cli_examples_per_second(first_task, nproc, threads, steps, batch_size)
            print(f"  {nproc} process(es) x {threads} thread(s): {rate:,.0f} examples/s")
    if args.startup:
        startup(first_task, device, int(first_batch), steps, repeats)


if __name__ == "__main__":
    main()
