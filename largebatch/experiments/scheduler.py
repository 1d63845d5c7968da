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

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from largebatch.experiments.sweep import run_cell, worker_pool
from largebatch.experiments.sweep_config import Cell
from largebatch.utils.errors import ConfigError


@dataclass
class Plan:
    """What a protocol still needs: ``pending`` cells (each with the sweep directory it
    belongs to) and, for the progress bar, how many cells it wants in all so far."""

    pending: list[tuple[Cell, Path]] = field(default_factory=list)
    total: int = 0


def run_cells(
    plan: Callable[[], Plan], *, jobs: int = 1, progress: bool = True, desc: str = "study"
) -> int:
    """Run what ``plan()`` asks for until it asks for nothing; return the number of cells run.

    With ``jobs > 1`` cells run in a :func:`~largebatch.experiments.sweep.worker_pool`
    of ``jobs`` processes (started once); with 1, in this process. A cell with
    ``nproc > 1`` trains in its own processes, started by ``train/launch.py``.
    ``plan()`` is called again after every finished cell and must return only
    cells not yet recorded.
    """
    if jobs < 1:
        raise ConfigError(f"Invalid jobs: {jobs} (must be >= 1)")
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
        with worker_pool(jobs) as pool:
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
    """``[function(item) for item in items]``, in a worker pool of ``jobs`` if ``jobs > 1``.

    For a study's post-processing (e.g. the diagnostics of each part), in the
    same workers as its runs. ``function`` must be picklable.
    """
    if jobs <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with worker_pool(jobs) as pool:
        return list(pool.map(function, items))
