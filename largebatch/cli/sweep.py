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

from largebatch.cli.run import parse_pairs, parse_target, parse_value

DEFAULT_SWEEP_DIR = "studies/sweep"


def _list(ctx: click.Context, param: click.Parameter, text: str | None) -> list | None:
    """``"64,256,full"`` -> ``[64, 256, "full"]`` (types are checked with the sweep)."""
    if text is None:
        return None
    return [parse_value(item) for item in text.split(",") if item.strip()]


def _flag_name(key: str) -> str:
    """The ``largebatch sweep`` flag that sets sweep key ``key`` (for error messages)."""
    return "--task-opt" if key == "task_options" else "--" + key.replace("_", "-")


def _load(file: str | None, directory: Path, flags: dict[str, Any]) -> Any:
    """The sweep: saved spec (if no file), then the file, then the flags; checked."""
    from largebatch.experiments.sweep import SWEEP_FILE, load_saved_spec
    from largebatch.experiments.sweep_config import SweepConfigError, load_sweep

    given = {key: value for key, value in flags.items() if value is not None}
    origins = {(key,): _flag_name(key) for key in given}
    try:
        saved = None if file is not None else load_saved_spec(directory)
        base = {k: v for k, v in saved.to_dict().items() if v is not None} if saved else None
        return load_sweep(
            file,
            overrides=given,
            origins=origins,
            base=base,
            base_origin=str(directory / SWEEP_FILE),
        )
    except SweepConfigError as error:
        raise click.UsageError(str(error)) from None


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
    from largebatch.experiments.results_store import ResultsStore, ResultsStoreError
    from largebatch.experiments.sweep import prepare, run_sweep
    from largebatch.experiments.sweep_config import SweepConfigError

    try:
        sweep = prepare(spec, directory)
        click.echo(f"{len(sweep.cells)} runs in {directory} ({jobs} at a time)", err=True)
        statuses = run_sweep(sweep, jobs=jobs, retry_failed=retry_failed, progress=progress)
        if diagnose:
            from largebatch.experiments.diagnose import diagnose_sweep

            click.echo(diagnose_sweep(directory, progress=progress).describe(), err=True)
        rows = [r for r in ResultsStore(directory).rows() if r["cell_id"] in statuses]
    except SweepConfigError as error:
        raise click.UsageError(str(error)) from None
    except ResultsStoreError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.ClickException("Interrupted; run the same command again to continue.") from None
    click.echo(summary(rows))
    warn_problems(rows, directory)
    if report:
        html_path, md_path = write_report(directory)
        click.echo(f"report: {html_path}  {md_path}")


def warn_problems(rows: list[dict[str, Any]], directory: Path) -> None:
    """A warning on stderr naming the runs that diverged, stayed at chance level or failed."""
    bad = {s: [r for r in rows if r["status"] == s] for s in ("diverged", "chance", "failed")}
    if not any(bad.values()):
        return
    counts = ", ".join(f"{len(v)} {PROBLEM_WORDS[s]}" for s, v in bad.items() if v)
    click.echo(f"warning: {counts} (see `largebatch results {directory}`)", err=True)
    for row in bad["chance"]:
        click.echo(f"  {row['cell_id']}: {row['error']}", err=True)


#: how a summary line names the runs of each problem status
PROBLEM_WORDS = {"diverged": "diverged", "chance": "stayed at chance level", "failed": "failed"}


@click.command("sweep")
@click.argument("directory", default=DEFAULT_SWEEP_DIR, type=click.Path(file_okay=False))
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML sweep file (flags override its keys).",
)
@click.option("--task", help="Task name or package.module:function.  [default: mnist1d-cnn]")
@click.option(
    "--task-opt",
    "task_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Task option, repeatable.",
)
@click.option(
    "--batch-sizes",
    callback=_list,
    metavar="B,B,...",
    help='Comma-separated batch sizes; "full" = the whole training set.',
)
@click.option(
    "--optimizers", callback=_list, metavar="NAME,...", help="Comma-separated optimizer names."
)
@click.option(
    "--seeds", callback=_list, metavar="S,...", help="Comma-separated seeds.  [default: 0]"
)
@click.option(
    "--lrs",
    callback=_list,
    metavar="LR,...",
    help="Base learning rates to try (best chosen per batch size on validation).",
)
@click.option(
    "--lr-factors",
    callback=_list,
    metavar="F,...",
    help="Multiples of each optimizer's default learning rate to try.",
)
@click.option("--epochs", type=float, help="Budget in epochs (the default kind of budget).")
@click.option("--steps", type=int, help="Budget in optimizer steps (same for every batch size).")
@click.option(
    "--target",
    callback=parse_target,
    metavar="NAME=VALUE",
    help="Target for steps-to-target, e.g. accuracy=0.9.  [default: the task's]",
)
@click.option("--evals-per-run", type=int, help="Evaluations per run.  [default: 30]")
@click.option("--nproc", type=int, help="Data-parallel processes per run.  [default: 1]")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs in parallel (separate processes).",
)
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
@click.option("--progress/--no-progress", default=True, help="Progress bar.")
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
    """
    directory_path = Path(directory)
    spec = _load(file, directory_path, flags)
    _run_and_report(spec, directory_path, jobs, retry_failed, report, progress, diagnose)


@click.command("report")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def report_cmd(directory: str) -> None:
    """Write DIRECTORY/report.html and report.md from the sweep's results."""
    from largebatch.experiments.report import report
    from largebatch.experiments.results_store import ResultsStoreError

    try:
        html_path, md_path = report(directory)
    except (ResultsStoreError, ValueError) as error:
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


@click.command("results")
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
@click.option("--columns", callback=_list, metavar="KEY,...", help="Columns to print.")
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
    from largebatch.experiments.results_store import (
        ResultsStore,
        ResultsStoreError,
        row_value,
        select_rows,
    )

    try:
        store = ResultsStore(directory, create=False)
        rows = select_rows(store.rows(), filters, sort)
        metrics = store.metric_names()
    except ResultsStoreError as error:
        raise click.ClickException(str(error)) from None
    except KeyError as error:
        raise click.UsageError(error.args[0]) from None
    if csv_path is not None:
        _write_csv(rows, csv_path)
        return
    shown = [str(c) for c in columns] if columns else DEFAULT_COLUMNS
    table = [shown] + [[_cell(row_value(row, c)) for c in shown] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(shown))]
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
