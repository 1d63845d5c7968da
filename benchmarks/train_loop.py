"""Speed of the training loop.

1. Per-step overhead of ``largebatch.train.train`` against a bare PyTorch loop
   (shuffle, index, forward, backward, ``step``, ``LambdaLR.step``) on the same
   model, optimizer and batch. Each loop runs ``--steps`` and ``3 x --steps``
   steps; the time difference divided by the step difference is the cost of one
   step, free of set-up, evaluation and checkpoint costs. Times are this
   process's CPU time with one thread, which other processes on a shared
   machine disturb far less than wall time. Target: <= 10% on mnist1d-cnn.
2. Cost of logging the gradient noise scale: the same per-step CPU time of
   ``train`` with ``accumulation_steps=2`` (where it is measured for free), with
   ``noise_scale`` off and on (measured every ``--noise-every`` steps). Reported,
   to be read against the 10% budget of (1).
3. Examples per second (wall clock) of 1 vs 2 gloo processes
   (``largebatch run --nproc``), from the ``wall_time`` in ``result.json`` of runs
   of two lengths, as above. Reported, no target.
4. Start-up of a 2-process run (``--startup``): a one-step ``largebatch run --nproc 2``
   against torchrun starting the same worker module (``python -m torch.distributed.run
   --standalone --nproc-per-node 2 -m largebatch.train.worker CONFIG``), alternating;
   CPU time of all processes together, and wall time. Reported, no target.

Run: ``python benchmarks/train_loop.py [--batch-size 64 256] [--steps 400] [--repeats 7]
[--noise-every 1 10] [--skip-overhead] [--skip-ddp] [--startup]``.
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
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from largebatch.optim import create_optimizer
from largebatch.tasks import get_task
from largebatch.train import RunConfig, train
from largebatch.train.schedules import WarmupThenDecay, build_scheduler

TASK = "mnist1d-cnn"
OPTIMIZER = {"momentum": 0.9}


def bare_loop_seconds(steps: int, batch_size: int) -> float:
    """CPU time of ``steps`` SGD steps written as plainly as PyTorch allows."""
    torch.manual_seed(0)
    task = get_task(TASK)
    inputs, targets = task.train.tensors
    model = task.build_model()
    optimizer = create_optimizer("sgd", model, lr=0.1, **OPTIMIZER)
    scheduler = build_scheduler(optimizer, WarmupThenDecay(steps, 0, "cosine"))
    per_epoch = len(inputs) // batch_size
    start = time.process_time()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(inputs))
        rows = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[rows]), targets[rows])
        loss.backward()
        optimizer.step()
        scheduler.step()
    return time.process_time() - start


def our_loop_seconds(steps: int, batch_size: int, **settings) -> float:
    """CPU time of ``train`` for ``steps`` steps (evaluations only at start and end).

    ``settings`` are further ``RunConfig`` fields (accumulation, noise scale).
    """
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(
            task=TASK, optimizer="sgd", optimizer_options=OPTIMIZER, lr=0.1,
            batch_size=batch_size, warmup_steps=0, steps=steps, eval_every=steps, out_dir=out,
            **settings,
        )  # fmt: skip
        start = time.process_time()
        train(config)
        return time.process_time() - start


def per_step(measure, steps: int, batch_size: int) -> float:
    """(time of 3 x steps - time of steps) / (2 x steps): one step's cost, in seconds."""
    return (measure(3 * steps, batch_size) - measure(steps, batch_size)) / (2 * steps)


def cli_examples_per_second(nproc: int, threads: int, steps: int, batch_size: int) -> float:
    """Examples/s of ``largebatch run --nproc`` from the step-count difference of two runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    times = []
    for n in (steps, 3 * steps):
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable, "-m", "largebatch", "run", "--task", TASK, "--optimizer", "sgd",
                "--lr", "0.1", "--batch-size", str(batch_size), "--steps", str(n),
                "--warmup", "0", "--eval-every", str(n), "--nproc", str(nproc),
                "--no-progress", "--out", out,
            ]  # fmt: skip
            subprocess.run(command, env=env, check=True, capture_output=True)
            times.append(json.loads((Path(out) / "result.json").read_text())["wall_time"])
    return 2 * steps * batch_size / (times[1] - times[0])


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup_seconds(launcher: str) -> tuple[float, float]:
    """(CPU, wall) seconds of a one-step 2-process run started by ``launcher``."""
    with tempfile.TemporaryDirectory() as root:
        config = RunConfig(
            task=TASK, optimizer="sgd", lr=0.1, batch_size=64, steps=1, warmup_steps=0,
            eval_every=1, nproc=2, out_dir=str(Path(root) / "run"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--noise-every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--skip-overhead", action="store_true", help="skip benchmark 1")
    parser.add_argument("--skip-ddp", action="store_true", help="skip benchmark 3")
    parser.add_argument("--startup", action="store_true", help="only benchmark 4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    get_task(TASK)  # generate and cache the data outside the timings
    if args.startup:
        print(f"Start-up of a one-step 2-process run (median of {args.repeats}, alternating)")
        times = {"largebatch": [], "torchrun": []}
        for _ in range(args.repeats):
            for launcher, measured in times.items():
                measured.append(startup_seconds(launcher))
        for launcher, measured in times.items():
            cpu, wall = (statistics.median(m[i] for m in measured) for i in (0, 1))
            print(f"  {launcher:>10}: CPU {cpu:.2f} s (all processes), wall {wall:.2f} s")
        return

    print(f"CPU time per step on {TASK}, SGD+momentum, 1 thread (median of {args.repeats})")
    for batch_size in args.batch_size if not args.skip_overhead else []:
        # alternate the two loops so that load changes on the machine hit both alike
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(per_step(bare_loop_seconds, args.steps, batch_size))
            ours.append(per_step(our_loop_seconds, args.steps, batch_size))
        overheads = [o / b - 1 for o, b in zip(ours, bare)]
        print(
            f"  batch {batch_size:>5}: bare {statistics.median(bare) * 1e3:.3f} ms,"
            f" largebatch {statistics.median(ours) * 1e3:.3f} ms,"
            f" overhead {statistics.median(overheads):+.1%} (target <= +10%;"
            f" repeats {min(overheads):+.1%} to {max(overheads):+.1%})"
        )

    print(f"\nNoise-scale logging, accumulation_steps=2 (median of {args.repeats})")
    settings = {"off": {"noise_scale": False}}
    settings.update({f"every {n}": {"noise_scale": True, "noise_scale_every": n}
                     for n in args.noise_every})  # fmt: skip
    for batch_size in args.batch_size:
        times = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, fields in settings.items():
                measure = partial(our_loop_seconds, accumulation_steps=2, **fields)
                times[name].append(per_step(measure, args.steps, batch_size))
        parts = [f"off {statistics.median(times['off']) * 1e3:.3f} ms"]
        for name in list(settings)[1:]:
            overheads = [t / o - 1 for t, o in zip(times[name], times["off"])]
            parts.append(
                f"{name} {statistics.median(times[name]) * 1e3:.3f} ms"
                f" ({statistics.median(overheads):+.1%},"
                f" repeats {min(overheads):+.1%} to {max(overheads):+.1%})"
            )
        print(f"  batch {batch_size:>5}: " + ", ".join(parts))

    if args.skip_ddp:
        return
    batch_size = args.batch_size[-1]
    print(f"\nExamples/s, largebatch run, batch {batch_size} (gloo, this machine)")
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        rate = cli_examples_per_second(nproc, threads, args.steps, batch_size)
        print(f"  {nproc} process(es) x {threads} thread(s): {rate:,.0f} examples/s")


if __name__ == "__main__":
    main()
