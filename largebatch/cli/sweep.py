"""``largebatch sweep``, ``results`` and ``report``: batch-size sweeps from the shell.

A sweep directory holds ``sweep.json`` (the sweep), ``results.sqlite`` (one row
per finished run), ``runs/<cell-id>/`` (each run's files) and, once reported,
``report.html``, ``report.md`` and ``figures/``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any

import click

from largebatch.cli.common import (
    Command,
    budget_options,
    defaults_of,
    fail_without_results,
    jobs_option,
    nproc_option,
    parse_list,
    parse_pairs,
    progress_option,
    shown,
    target_option,
    task_options,
    warn_problems,
)
from largebatch.experiments.sweep_config import SweepSpec

DEFAULT_SWEEP_DIR = "studies/sweep"
SPEC_DEFAULTS = defaults_of(SweepSpec)


def _flag_name(key: str) -> str:
    """The ``largebatch sweep`` flag that sets sweep key ``key`` (for error messages)."""
    return "--task-opt" if key == "task_options" else "--" + key.replace("_", "-")


def _load(file: str | None, directory: Path, flags: dict[str, Any]) -> Any:
    """The sweep: saved spec (if no file), then the file, then the flags; checked."""
    from largebatch.experiments.sweep import SWEEP_FILE, load_saved_spec
    from largebatch.experiments.sweep_config import load_sweep

    given = {key: value for key, value in flags.items() if value is not None}
    origins = {(key,): _flag_name(key) for key in given}
    saved = None if file is not None else load_saved_spec(directory)
    base = {k: v for k, v in saved.to_dict().items() if v is not None} if saved else None
    return load_sweep(
        file, overrides=given, origins=origins, base=base, base_origin=str(directory / SWEEP_FILE)
    )


def _run_and_report(
    spec: Any,
    directory: Path,
    jobs: int,
    retry_failed: bool,
    report: bool,
    progress: bool,
    diagnose: bool = False,
) -> None:
    """Prepare, run, summarise, (optionally) diagnose and report; errors become click errors."""
    from largebatch.experiments.report import report as write_report
    from largebatch.experiments.report import summary
    from largebatch.experiments.results_store import ResultsStore
    from largebatch.experiments.sweep import prepare, run_sweep

    try:
        sweep = prepare(spec, directory)
        click.echo(f"{len(sweep.cells)} runs in {directory} ({jobs} at a time)", err=True)
        statuses = run_sweep(sweep, jobs=jobs, retry_failed=retry_failed, progress=progress)
        if diagnose:
            from largebatch.experiments.diagnose import diagnose_sweep

            click.echo(diagnose_sweep(directory, progress=progress).describe(), err=True)
        rows = [r for r in ResultsStore(directory).rows() if r["cell_id"] in statuses]
    except KeyboardInterrupt:
        raise click.ClickException(
            "Interrupted; finished runs are recorded and the others keep their checkpoints. "
            "Run the same command again to continue."
        ) from None
    click.echo(summary(rows))
    warn_problems(rows, directory)
    if report:
        html_path, md_path = write_report(directory)
        click.echo(f"report: {html_path}  {md_path}")
    fail_without_results(rows, directory)


@click.command("sweep", cls=Command)
@click.argument("directory", default=DEFAULT_SWEEP_DIR, type=click.Path(file_okay=False))
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML sweep file (flags override its keys).",
)
@task_options(SPEC_DEFAULTS["task"])
@click.option(
    "--batch-sizes",
    callback=parse_list,
    metavar="B,B,...",
    help='Comma-separated batch sizes; "full" = the whole training set.'
    + shown(",".join(map(str, SPEC_DEFAULTS["batch_sizes"]))),
)
@click.option(
    "--optimizers",
    callback=parse_list,
    metavar="NAME,...",
    help="Comma-separated optimizer names." + shown(",".join(SPEC_DEFAULTS["optimizers"])),
)
@click.option(
    "--topologies",
    callback=parse_list,
    metavar="NAME,...",
    help="Comma-separated topologies, a grid axis of the decentralized optimizers "
    "(dmsgd, decentlam) only." + shown("each optimizer's"),
)
@click.option(
    "--seeds",
    callback=parse_list,
    metavar="S,...",
    help="Comma-separated seeds." + shown(",".join(map(str, SPEC_DEFAULTS["seeds"]))),
)
@click.option(
    "--lrs",
    callback=parse_list,
    metavar="LR,...",
    help="Base learning rates to try (best chosen per batch size on validation).",
)
@click.option(
    "--lr-factors",
    callback=parse_list,
    metavar="F,...",
    help="Multiples of each optimizer's default learning rate to try.",
)
@click.option(
    "--batch-growths",
    callback=parse_list,
    metavar="NAME,...",
    help='Batch-size controllers to try (a grid axis; "none": a fixed batch).'
    + shown(",".join(SPEC_DEFAULTS["batch_growths"])),
)
@click.option(
    "--averagings",
    callback=parse_list,
    metavar="KIND,...",
    help="Iterate averages to evaluate too (a grid axis: none, polyak, ema)."
    + shown(",".join(SPEC_DEFAULTS["averagings"])),
)
@budget_options(SPEC_DEFAULTS["epochs"])
@target_option("the task's")
@click.option(
    "--evals-per-run", type=int, help="Evaluations per run." + shown(SPEC_DEFAULTS["evals_per_run"])
)
@nproc_option(SPEC_DEFAULTS["nproc"])
@jobs_option(1)
@click.option("--retry-failed", is_flag=True, help="Run again the cells recorded as failed.")
@click.option(
    "--diagnose",
    is_flag=True,
    help="Add sharpness, top Hessian eigenvalue and trace of every finished run to the "
    "results (only for runs that lack them) and the interpolation between the smallest- "
    "and largest-batch solutions to the report.",
)
@click.option(
    "--report/--no-report", default=True, show_default=True, help="Write the report at the end."
)
@progress_option(True)
def sweep(
    directory: str,
    file: str | None,
    jobs: int,
    retry_failed: bool,
    diagnose: bool,
    report: bool,
    progress: bool,
    **flags: Any,
) -> None:
    """Run a batch-size x optimizer x seed grid into DIRECTORY (default studies/sweep).

    Re-running continues: finished runs are skipped, interrupted ones resume. Without
    --file, the sweep saved in DIRECTORY (if any) is the starting point for the flags.
    Exits with status 1 if every run failed, diverged or stayed at chance level.
    """
    directory_path = Path(directory)
    spec = _load(file, directory_path, flags)
    _run_and_report(spec, directory_path, jobs, retry_failed, report, progress, diagnose)


@click.command("report", cls=Command)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def report_cmd(directory: str) -> None:
    """Write DIRECTORY/report.html and report.md from the sweep's results."""
    from largebatch.experiments.report import report

    try:
        html_path, md_path = report(directory)
    except ValueError as error:  # no runs recorded yet
        raise click.ClickException(str(error)) from None
    click.echo(f"report: {html_path}  {md_path}")


DEFAULT_COLUMNS = [
    "cell_id", "optimizer", "batch_size", "lr", "seed", "status", "final_test_accuracy",
    "final_train_accuracy", "final_val_accuracy", "steps", "steps_to_target", "wall_time",
]  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@click.command("results", cls=Command)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Keep rows where KEY (column, metric or config field) equals VALUE; repeatable.",
)
@click.option("--sort", metavar="[-]KEY", help="Sort by KEY (prefix - for descending).")
@click.option(
    "--columns",
    callback=parse_list,
    metavar="KEY,...",
    help="Columns to print (a column, metric or config field)." + shown(",".join(DEFAULT_COLUMNS)),
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False),
    help="Write the selected rows, every column, to this CSV file ('-' for stdout).",
)
def results(
    directory: str,
    filters: dict | None,
    sort: str | None,
    columns: list | None,
    csv_path: str | None,
) -> None:
    """Print the runs recorded in DIRECTORY/results.sqlite."""
    from largebatch.experiments.results_store import ResultsStore, row_value, select_rows

    store = ResultsStore(directory, create=False)
    picked = [str(c) for c in columns] if columns else DEFAULT_COLUMNS
    rows = select_rows(store.rows(), filters, sort, columns=picked if columns else None)
    metrics = store.metric_names()
    if csv_path is not None:
        _write_csv(rows, csv_path)
        return
    table = [picked] + [[_cell(row_value(row, c)) for c in picked] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(picked))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(
        f"{len(rows)} run(s); other columns: {', '.join(metrics) or '-'}, any config field",
        err=True,
    )


def _write_csv(rows: list, path: str) -> None:
    """Every column; ``config`` and ``extra`` as JSON. The file is written atomically."""
    from largebatch.utils.atomic import atomic_write

    keys = list(dict.fromkeys(k for row in rows for k in row))
    output = (
        contextlib.nullcontext(sys.stdout)
        if path == "-"
        else atomic_write(Path(path).absolute(), "w", newline="")
    )
    with output as out:
        writer = csv.DictWriter(out, keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
            )
