"""Per-run overhead of a study cell against the same training in one process.

Studies are hundreds of small runs, so what a cell costs besides its training
matters. For ``--runs`` identical small cells (mnist1d-cnn, ``--batch-size``,
``--epochs``) this measures, in one process with one torch thread:

A. training only: ``train(config, task)`` with the task built once, one
   evaluation at the end and no checkpoint: the work itself;
S. start-up: ``train(config)`` with the task rebuilt from its name and the run
   directory's files, still one evaluation and no checkpoint (S - A: what a run
   pays before and after training);
B. a cell's run: ``train(config)`` as a sweep runs it (S plus ``--evals``
   evaluations with a checkpoint at each);
C. a cell: :func:`largebatch.experiments.sweep.run_cell` (B plus opening the
   results database, locking the run directory and recording the row);
D. cells through :func:`largebatch.experiments.scheduler.run_cells` with 2 jobs:
   the CPU time of the two spawned workers (start-up, imports, C for each cell)
   per cell, and the wall time per cell (the throughput a study gets on 2 cores,
   which a shared machine inflates);
D1. the same cells through ``run_cells`` with 1 job (in this process): with D, the
   parallel speed-up (D1's wall time over D's) and each one's CPU utilisation, CPU
   time / (wall time x jobs).

A, B and C are this process's CPU time (``time.process_time``), D its children's
(``resource.getrusage``) and D1 both, which other processes on a shared machine
disturb far less than wall time; the rounds are interleaved (A, S, B, C, D, D1, A,
...) and the median over ``--repeats`` is printed, with ratios to A.

Run: ``python benchmarks/study_overhead.py [--runs 6] [--repeats 3] [--batch-size 256]
[--epochs 2] [--evals 10]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from largebatch.experiments.scheduler import Plan, run_cells
from largebatch.experiments.sweep import prepare, run_cell
from largebatch.experiments.sweep_config import load_sweep
from largebatch.tasks import get_task
from largebatch.train import train


def cells(directory: Path, runs: int, batch_size: int, epochs: float, evals: int) -> list:
    spec = load_sweep(
        overrides={
            "task": "mnist1d-cnn", "batch_sizes": [batch_size], "optimizers": ["adamw"],
            "seeds": list(range(runs)), "epochs": epochs, "evals_per_run": evals,
        }
    )  # fmt: skip
    return list(prepare(spec, directory).cells)


def training_only(todo: list, task) -> float:
    start = time.process_time()
    for cell in todo:
        with tempfile.TemporaryDirectory() as out:
            config = replace(cell.config, out_dir=out, eval_every=10**9, checkpoint_every=None)
            train(config, task)
    return time.process_time() - start


def cell_runs(todo: list, evaluations: bool = True) -> float:
    start = time.process_time()
    for cell in todo:
        with tempfile.TemporaryDirectory() as out:
            config = replace(cell.config, out_dir=out)
            if not evaluations:
                config = replace(config, eval_every=10**9, checkpoint_every=None)
            train(config)
    return time.process_time() - start


def recorded_cells(todo: list, directory: Path) -> float:
    start = time.process_time()
    for cell in todo:
        run_cell(cell, directory)
    return time.process_time() - start


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers), in seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def jobs_cells(todo: list, directory: Path, jobs: int) -> tuple[float, float]:
    """(CPU s, wall s) of running ``todo`` through ``run_cells`` with ``jobs`` jobs."""
    pending = list(todo)

    def plan() -> Plan:
        from largebatch.experiments.results_store import ResultsStore

        done = set(ResultsStore(directory).statuses())
        left = [(c, directory) for c in pending if c.cell_id not in done]
        return Plan(left, len(pending))

    cpu, start = cpu_seconds(), time.perf_counter()
    run_cells(plan, jobs=jobs, progress=False)
    return cpu_seconds() - cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--evals", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("mnist1d-cnn")
    keys = ("A", "S", "B", "C", "D", "D wall", "D1", "D1 wall")
    times: dict[str, list[float]] = {key: [] for key in keys}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as root:
            root = Path(root)
            todo = cells(root / "c", args.runs, args.batch_size, args.epochs, args.evals)
            times["A"].append(training_only(todo, task) / args.runs)
            times["S"].append(cell_runs(todo, evaluations=False) / args.runs)
            times["B"].append(cell_runs(todo) / args.runs)
            times["C"].append(recorded_cells(todo, root / "c") / args.runs)
            for key, jobs in (("D", 2), ("D1", 1)):
                where = root / key.lower()
                todo = cells(where, args.runs, args.batch_size, args.epochs, args.evals)
                cpu, wall = jobs_cells(todo, where, jobs)
                times[key].append(cpu / args.runs)
                times[f"{key} wall"].append(wall / args.runs)
        print(f"round {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    a = statistics.median(times["A"])
    labels = {
        "A": "training only (CPU s per run)",
        "S": "start-up: task build, run directory files (CPU s)",
        "B": "a cell's run: S + evaluations and checkpoints (CPU s)",
        "C": "a recorded cell: B + results database, lock (CPU s)",
        "D": "cells through run_cells, 2 jobs: workers' CPU s per cell",
        "D wall": "the same, wall s per cell (2 cores, shared machine)",
        "D1": "cells through run_cells, 1 job: CPU s per cell",
        "D1 wall": "the same, wall s per cell",
    }
    print(f"\nmnist1d-cnn, batch {args.batch_size}, {args.epochs:g} epochs, "
          f"{args.evals} evaluations per cell, {args.runs} runs, median of {args.repeats}")  # fmt: skip
    for key, label in labels.items():
        value = statistics.median(times[key])
        print(f"{key:<6} {label:<66} {value:7.3f}  {value / a:5.2f}x A")
    s, b, c = (statistics.median(times[k]) for k in "SBC")
    print(
        f"per-run overhead of a cell (C - A): {c - a:.3f} CPU s = start-up {s - a:.3f} "
        f"+ evaluations and checkpoints {b - s:.3f} + database and lock {c - b:.3f}"
    )
    d, d_wall, d1, d1_wall = (statistics.median(times[k]) for k in keys[4:])
    print(
        f"parallel speed-up, 2 jobs against 1: {d1_wall / d_wall:.2f}x (wall {d1_wall:.3f} "
        f"against {d_wall:.3f} s per cell); CPU utilisation, CPU / (wall x jobs): "
        f"1 job {d1 / d1_wall:.0%}, 2 jobs {d / (2 * d_wall):.0%}"
    )


if __name__ == "__main__":
    main()
