"""``largebatch sweep --diagnose``: flatness and curvature of a sweep's finished runs.

A resumable pass over the results database. Every run recorded as done that
lacks the diagnostics' columns is measured from its final checkpoint
(:func:`~largebatch.experiments.checkpoint_diagnostics.run_diagnostics` with
:data:`SWEEP_SETTINGS`); the full record goes to
``runs/<id>/diagnostics.json`` and the headline numbers (``sharpness``,
``top_eigenvalue``, ``hessian_trace``, ``hessian_trace_stderr``) into the
database through :meth:`ResultsStore.record_metrics`, so they become columns
without a schema change. Then, for every series, the line between the
smallest- and the largest-batch solution is evaluated and kept in
``DIR/interpolation.json`` for the report. A rerun measures only what is
missing; a ``diagnostics.json`` written before an interruption is reused.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from largebatch.experiments import analysis
from largebatch.experiments.checkpoint_diagnostics import (
    DIAGNOSTICS_FILE,
    MAIN_EPSILON,
    DiagnosticsSettings,
    expected_metrics,
    interpolate_runs,
    load_run,
    run_diagnostics,
    summary_metrics,
)
from largebatch.experiments.results_store import ResultsStore
from largebatch.utils.atomic import write_json_atomic
from largebatch.utils.locking import locked

INTERPOLATION_FILE = "interpolation.json"
#: what is measured per run: the headline numbers, quickly (a few seconds on mnist1d-cnn)
SWEEP_SETTINGS = DiagnosticsSettings(
    num_examples=1024, epsilons=(MAIN_EPSILON,), subspace_dim=None, k=1, tol=1e-2, num_probes=20
)


@dataclass
class DiagnoseSummary:
    """What a pass did: runs measured, reused from ``diagnostics.json``, failed; series interpolated."""

    measured: int = 0
    reused: int = 0
    failed: int = 0
    interpolated: int = 0

    def describe(self) -> str:
        return (
            f"diagnostics: {self.measured} run(s) measured, {self.reused} reused, "
            f"{self.failed} failed; {self.interpolated} interpolation(s)"
        )


def missing_diagnostics(rows: list[dict[str, Any]], settings: DiagnosticsSettings) -> list[dict]:
    """Rows of finished runs without every column ``settings`` produces."""
    wanted = expected_metrics(settings)
    return [r for r in rows if r["status"] == "done" and any(n not in r for n in wanted)]


def _saved_record(run_dir: Path, settings: DiagnosticsSettings) -> dict[str, Any] | None:
    """The run's ``diagnostics.json`` if it was measured with ``settings``."""
    try:
        record = json.loads((run_dir / DIAGNOSTICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if _same_settings(record.get("settings"), settings) else None


def _same_settings(saved: dict[str, Any] | None, settings: DiagnosticsSettings) -> bool:
    """Whether settings read back from JSON (lists for tuples) are ``settings``."""
    try:
        return DiagnosticsSettings.from_dict(saved) == settings
    except (TypeError, ValueError):  # missing or from another version
        return False


def diagnose_sweep(
    directory: str | Path, settings: DiagnosticsSettings = SWEEP_SETTINGS, progress: bool = True
) -> DiagnoseSummary:
    """Add diagnostics columns to every finished run lacking them, then the interpolations.

    A run whose measurement fails (no checkpoint, an exception) is warned about
    and left without the columns, so the next pass tries it again.
    """
    directory = Path(directory)
    store = ResultsStore(directory, create=False)
    summary = DiagnoseSummary()
    todo = missing_diagnostics(store.rows(), settings)
    for row in tqdm(todo, desc="diagnose", unit="run", disable=not progress, dynamic_ncols=True):
        run_dir = directory / row["run_dir"]
        with locked(run_dir, wait=True):
            current = {r["cell_id"]: r for r in store.rows()}[row["cell_id"]]
            if not missing_diagnostics([current], settings):
                continue  # another process measured it meanwhile
            record = _saved_record(run_dir, settings)
            try:
                if record is None:
                    record = run_diagnostics(load_run(run_dir), settings)
                    write_json_atomic(run_dir / DIAGNOSTICS_FILE, record)
                    summary.measured += 1
                else:
                    summary.reused += 1
            except Exception as exc:  # one unusable run must not stop the pass
                warnings.warn(f"diagnostics of {row['cell_id']} failed: {exc}", stacklevel=2)
                summary.failed += 1
                continue
            store.record_metrics(row["cell_id"], summary_metrics(record))
    summary.interpolated = interpolate_series(directory, store.rows(), settings)
    return summary


def interpolation_pairs(rows: list[dict[str, Any]]) -> dict[str, tuple[dict, dict]]:
    """Per series: the first finished run at its smallest and at its largest batch size.

    Points are those of the report (learning rate chosen on validation); series
    with fewer than two batch sizes that finished are left out.
    """
    pairs = {}
    for series, pts in analysis.by_series(analysis.points(rows)).items():
        finished = [
            next(r for r in p.runs if r["status"] == "done") for p in pts if "done" in p.statuses
        ]
        if len(finished) >= 2:
            pairs[series] = (finished[0], finished[-1])
    return pairs


def interpolate_series(
    directory: Path, rows: list[dict[str, Any]], settings: DiagnosticsSettings
) -> int:
    """Write ``DIR/interpolation.json``: per series, the small- to large-batch curves.

    Entries already there for the same pair of runs and settings are kept.
    Returns the number of series computed now.
    """
    path = directory / INTERPOLATION_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    computed = 0
    for series, (small, large) in interpolation_pairs(rows).items():
        ends = {
            name: {"cell_id": row["cell_id"], "batch_size": row["batch_size"]}
            for name, row in (("small", small), ("large", large))
        }
        entry = saved.get(series, {})
        same_runs = (entry.get("small"), entry.get("large")) == (ends["small"], ends["large"])
        if same_runs and _same_settings(entry.get("settings"), settings):
            continue
        try:
            result = interpolate_runs(
                load_run(directory / small["run_dir"]), load_run(directory / large["run_dir"]),
                settings,
            )  # fmt: skip
        except Exception as exc:  # e.g. a checkpoint removed by hand
            warnings.warn(f"interpolation of {series} failed: {exc}", stacklevel=2)
            continue
        saved[series] = {**ends, "settings": settings.to_dict(), **result.to_dict()}
        write_json_atomic(path, saved)
        computed += 1
    return computed
