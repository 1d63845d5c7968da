"""Run cells whose list depends on the results so far, ``jobs`` at a time, until none is missing.

A plain sweep knows all its cells up front. A study does not: which learning
rates a cell needs next depends on the ones already measured (the tuner extends
a grid whose best value is at its edge), the seeds run once the learning rate
is chosen, and a warm-started run needs the run it starts from. :func:`run_cells`
asks ``plan()`` for what is missing, keeps ``jobs`` worker processes busy with it,
and asks again after every finished cell, so new cells start as soon as they are
known and no round of a protocol waits for the slowest run of the previous one.

Each cell runs through :func:`~largebatch.experiments.sweep.run_cell`: recorded
by the process that ran it, in the results database of its own sweep directory,
under the lock of its run directory. So a study killed at any moment resumes
like a sweep: ``plan()`` replays the protocol from the databases, recorded cells
are not run again and an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from largebatch.experiments.sweep import run_cell
from largebatch.experiments.sweep_config import Cell


@dataclass
class Plan:
    """What a protocol still needs: ``pending`` cells (each with the sweep directory it
    belongs to) and, for the progress bar, how many cells it wants in all so far."""

    pending: list[tuple[Cell, Path]] = field(default_factory=list)
    total: int = 0


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_cells(
    plan: Callable[[], Plan], *, jobs: int = 1, progress: bool = True, desc: str = "study"
) -> int:
    """Run what ``plan()`` asks for until it asks for nothing; return the number of cells run.

    With ``jobs > 1`` cells run in ``jobs`` spawned worker processes (started once,
    each with ``cpu_count // jobs`` torch threads); with 1, in this process.
    ``plan()`` is called again after every finished cell and must return only
    cells not yet recorded.
    """
    if jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs} (must be >= 1)")
    bar = tqdm(desc=desc, unit="run", dynamic_ncols=True, disable=not progress)
    running: dict[Future, Cell] = {}
    ran = 0

    def refresh() -> list[tuple[Cell, Path]]:
        current = plan()
        bar.total = current.total
        bar.n = current.total - len(current.pending)
        bar.refresh()
        busy = {cell.cell_id for cell in running.values()}
        return [(cell, where) for cell, where in current.pending if cell.cell_id not in busy]

    def finished(cell: Cell) -> None:
        nonlocal ran
        bar.set_postfix_str(cell.cell_id, refresh=False)
        ran += 1

    try:
        if jobs == 1:
            while todo := refresh():
                cell, where = todo[0]
                run_cell(cell, where)
                finished(cell)
            return ran
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, context, _set_threads, (threads,)) as pool:
            try:
                todo = refresh()
                while todo or running:
                    for cell, where in todo[: jobs - len(running)]:
                        running[pool.submit(run_cell, cell, where)] = cell
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # a worker's exception (not a failed run) stops the study
                        finished(running.pop(future))
                    todo = refresh()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return ran
    finally:
        bar.close()


def map_in_workers(function: Callable, items: list, jobs: int = 1) -> list:
    """``[function(item) for item in items]``, in ``jobs`` spawned workers if ``jobs > 1``.

    For a study's post-processing (e.g. the diagnostics of each part), with one
    torch thread per worker as for its runs. ``function`` must be picklable.
    """
    if jobs <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(min(jobs, len(items)), context, _set_threads, (threads,)) as pool:
        return list(pool.map(function, items))
