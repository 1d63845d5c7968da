"""Run a sweep's cells: skip finished ones, resume interrupted ones, record every outcome.

Each cell trains in its run directory ``DIR/runs/<cell-id>`` and is recorded in
``DIR/results.sqlite`` by the process that ran it, under an exclusive lock on
the run directory; so a sweep killed at any moment loses nothing and recomputes
nothing: on the next start, recorded cells are skipped, a run whose
``result.json`` was written but not recorded is recorded, and any other started
run resumes from its latest checkpoint (cells checkpoint at every evaluation).
A cell that fails or diverges is recorded with its reason and the sweep goes on.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep_config import Cell, SweepConfigError, SweepSpec, cell_name, expand
from largebatch.tasks import get_task
from largebatch.train import RunConfig, RunPlan, RunResult, launch, plan_run, train
from largebatch.train.distributed import pick_device
from largebatch.train.run_dir import RunDirectory, read_result
from largebatch.utils.atomic import write_json_atomic
from largebatch.utils.errors import ConfigError, LargeBatchError
from largebatch.utils.locking import locked
from largebatch.utils.processes import die_with_parent

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Sweep:
    """A checked sweep ready to run: its spec, directory and cells."""

    spec: SweepSpec
    directory: Path
    cells: tuple[Cell, ...]


def prepare(spec: SweepSpec, directory: str | Path) -> Sweep:
    """Expand ``spec`` into cells and check every cell as ``largebatch run`` would.

    Builds the task once (to resolve ``"full"`` and each cell's number of steps),
    sets each cell's evaluation interval to ``1/evals_per_run`` of its run and,
    unless the spec sets one, checkpoints at every evaluation. Each cell carries
    its plan, which a one-process cell trains by. Raises
    :class:`SweepConfigError` naming the cell if any would be rejected.
    """
    directory = Path(directory)
    try:
        task = get_task(spec.task, **spec.task_options)
    except (LargeBatchError, ValueError, TypeError, ImportError) as exc:
        raise SweepConfigError(f"task {spec.task!r}: {exc}") from None
    try:
        pick_device(spec.device, local_rank=spec.nproc - 1)
    except ConfigError as exc:
        raise SweepConfigError(f"device: {exc}") from None

    plans = []

    def eval_every(config: RunConfig) -> int:
        try:
            plans.append(plan_run(config, task))
        except ConfigError as exc:
            raise SweepConfigError(f"cell {cell_name(config)}: {exc}") from None
        return max(1, math.ceil(plans[-1].total_steps / spec.evals_per_run))

    cells = expand(spec, directory, len(task.train), eval_every)
    # the plan reads eval_every only as given: the cell's plan is the one made, at its interval
    cells = [
        replace(cell, plan=replace(plan, eval_every=cell.config.eval_every))
        for cell, plan in zip(cells, plans, strict=True)
    ]
    return Sweep(spec, directory, tuple(cells))


def load_saved_spec(directory: str | Path) -> SweepSpec | None:
    """The spec a previous ``run_sweep`` saved in ``directory`` (``sweep.json``), if any."""
    path = Path(directory) / SWEEP_FILE
    if not path.exists():
        return None
    return SweepSpec.from_dict(json.loads(path.read_text()))


# --- one cell -----------------------------------------------------------------------


def _train_data_parallel(config: RunConfig) -> RunResult:
    """Run a cell in ``config.nproc`` worker processes, as ``largebatch run --nproc`` does."""
    started = time.time()
    status = launch(config)
    result = read_result(config.out_dir, since=started)
    if result is None:
        raise RuntimeError(
            f"the {config.nproc} workers exited with status {status} without writing result.json"
        )
    return result


def _train(config: RunConfig, plan: RunPlan | None) -> RunResult:
    """Train (resuming from a checkpoint if there is one) by ``plan`` if made; an exception
    becomes "failed". Data-parallel workers plan for themselves."""
    config = replace(config, resume=True, progress=False)
    start = time.perf_counter()
    try:
        return _train_data_parallel(config) if config.nproc > 1 else train(config, plan=plan)
    except Exception as exc:  # a failed cell is a result; the sweep goes on
        log = RunDirectory(config.out_dir).write_error(traceback.format_exc())
        return RunResult(
            status="failed",
            steps=0,
            examples=0,
            wall_time=time.perf_counter() - start,
            error=f"{type(exc).__name__}: {exc}",
            error_log=str(log),
        )


def run_cell(cell: Cell, store_path: str | Path, retry_failed: bool = False) -> str:
    """Run one cell unless already recorded; record its outcome; return its status.

    Safe to call from several processes (and sweeps) at once: the run directory
    is locked while the cell runs, and the recorded status is checked under it.
    """
    run_dir = cell.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(store_path)
    with locked(run_dir, wait=True):
        recorded = store.statuses().get(cell.cell_id)
        if recorded is not None and not (retry_failed and recorded == "failed"):
            return recorded
        result = read_result(run_dir)
        if result is None or (retry_failed and result.status == "failed"):
            result = _train(cell.config, cell.plan)
        if result.status == "diverged" and result.error is None:
            result = replace(result, error=f"non-finite loss by step {result.steps}")
        relative = os.path.relpath(run_dir, store.path.parent)
        store.record_run(cell.cell_id, cell.config, result, run_dir=relative)
    return result.status


def _init_worker(threads: int) -> None:
    """Set up a process of the pool: it dies with the sweep, and shares the cores."""
    import torch

    die_with_parent()
    torch.set_num_threads(threads)


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes that die with this one, each with
    ``cpu_count // jobs`` torch threads (so that the pool shares the cores)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), _init_worker, (threads,))


# --- the sweep ------------------------------------------------------------------------


def pending_cells(sweep: Sweep, store: ResultsStore, retry_failed: bool = False) -> list[Cell]:
    """Cells not yet recorded (and, with ``retry_failed``, those recorded as failed)."""
    statuses = store.statuses()
    return [
        cell
        for cell in sweep.cells
        if statuses.get(cell.cell_id) is None
        or (retry_failed and statuses[cell.cell_id] == "failed")
    ]


def run_sweep(
    sweep: Sweep,
    *,
    jobs: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Run every pending cell, ``jobs`` at a time; return ``cell_id -> status`` of all cells.

    With ``jobs > 1`` cells run in separate processes, each with
    ``cpu_count // jobs`` torch threads. The spec is saved as ``DIR/sweep.json``
    so that ``largebatch sweep DIR`` can continue it without repeating the flags.
    """
    if jobs < 1:
        raise ConfigError(f"Invalid jobs: {jobs} (must be >= 1)")
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep.directory / SWEEP_FILE, sweep.spec.to_dict())
    store = ResultsStore(sweep.directory)
    todo = pending_cells(sweep, store, retry_failed)
    bar = tqdm(
        total=len(sweep.cells),
        initial=len(sweep.cells) - len(todo),
        desc="sweep",
        unit="run",
        dynamic_ncols=True,
        disable=not progress,
    )

    def done(cell: Cell, status: str) -> None:
        bar.set_postfix_str(f"{cell.cell_id}: {status}", refresh=False)
        bar.update()

    try:
        if jobs == 1:
            for cell in todo:
                done(cell, run_cell(cell, store.path, retry_failed))
        else:
            with worker_pool(jobs) as pool:
                futures = {
                    pool.submit(run_cell, cell, store.path, retry_failed): cell for cell in todo
                }
                try:
                    remaining = set(futures)
                    while remaining:
                        finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                        for future in finished:
                            done(futures[future], future.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    statuses = store.statuses()
    return {cell.cell_id: statuses.get(cell.cell_id, "pending") for cell in sweep.cells}
