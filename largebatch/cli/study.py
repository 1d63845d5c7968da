"""``largebatch study`` and ``largebatch demo``: the registered studies from the shell.

A study directory holds ``study.json`` (which study, quick or not), one sweep
directory per part and, once reported, ``report.html``, ``report.md`` and
``figures/``. Re-running the same command continues a killed study.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from largebatch.cli.common import (
    Command,
    compose,
    default_jobs,
    fail_without_results,
    jobs_option,
    progress_option,
    warn_problems,
)

DEMO_DIR = "studies/demo"

#: what ``study`` and ``demo`` both take
_RUN_OPTIONS = compose(
    click.option("--quick", is_flag=True, help="A few small runs of every step (a smoke test)."),
    jobs_option(None),
    progress_option(True),
)


def _run(name: str, directory: str | None, quick: bool, jobs: int | None, progress: bool) -> None:
    """Run a study, print its summary, warn about flagged runs, name the report.

    Exits with status 1 if the study recorded runs and none of them finished normally.
    """
    from largebatch.experiments.studies import get_study, run_study
    from largebatch.experiments.studies.base import MARKER, results
    from largebatch.experiments.studies.common import text_table

    study = get_study(name)
    path = Path(directory or f"studies/{name}{'-quick' if quick else ''}")
    jobs = jobs or default_jobs()
    click.echo(
        f"study {name} in {path} ({jobs} runs at a time){' --quick' if quick else ''}", err=True
    )
    try:
        html_path, md_path = run_study(study, path, quick=quick, jobs=jobs, progress=progress)
    except KeyboardInterrupt:
        raise click.ClickException(
            "Interrupted; finished runs are recorded and the others keep their checkpoints. "
            "Run the same command again to continue."
        ) from None
    context = results(study, path, quick)
    if study.summary is not None:
        click.echo(study.summary(context))
    else:
        sections = study.sections(context)
        table = next((t for s in sections for t in s.tables), None)
        if table is not None:
            click.echo(text_table(table, sections[0].title))
    for part in context.parts.values():
        _warn(part)
    cpu = json.loads((path / MARKER).read_text()).get("cpu_seconds", 0.0)
    click.echo(f"CPU time of the study: {cpu:.0f} s ({cpu / 60:.1f} min) in all")
    click.echo(f"report: {html_path}  {md_path}")
    fail_without_results([row for part in context.parts.values() for row in part.wanted], path)


def _warn(part) -> None:
    """Name the flagged runs the results rest on; count those the tuning discarded."""
    chosen = {row["cell_id"] for point in part.report.points for row in point.runs}
    bad = [r for r in part.wanted if r["status"] != "done"]
    warn_problems([r for r in bad if r["cell_id"] in chosen], part.directory)
    discarded = [r for r in bad if r["cell_id"] not in chosen]
    if discarded:
        click.echo(
            f"note: {len(discarded)} run(s) of the learning-rate search in {part.directory} "
            "diverged, stayed at chance level or failed; they lost the tuning "
            f"(see `largebatch results {part.directory}`)",
            err=True,
        )


def _list_studies() -> None:
    from largebatch.experiments.studies import list_studies

    studies = list_studies()
    width = max(len(study.name) for study in studies)
    for study in studies:
        full, quick = study.minutes
        click.echo(f"{study.name:<{width}} {study.title}")
        click.echo(f"{'':<{width}} about {full:g} min on 2 idle CPU cores (--quick: {quick:g} min)")


@click.command("study", cls=Command)
@click.argument("name", required=False)
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--list", "show_list", is_flag=True, help="List the studies and their run times.")
@_RUN_OPTIONS
def study(
    name: str | None, directory: str | None, show_list: bool, quick: bool, jobs: int | None,
    progress: bool,
) -> None:  # fmt: skip
    """Run study NAME into DIRECTORY (default studies/NAME); --list shows the studies.

    Each study reproduces a source paper's headline experiment at laptop scale,
    with learning rates tuned per cell on the validation split, and writes
    DIRECTORY/report.html with the paper's numbers next to ours. Re-running
    continues. Exits with status 1 if no run finished normally (every one failed,
    diverged or stayed at chance level).
    """
    if show_list:
        _list_studies()
        return
    if name is None:
        raise click.UsageError("Give a study name (see `largebatch study --list`).")
    _run(name, directory, quick, jobs, progress)


@click.command("demo", cls=Command)
@click.option(
    "--out",
    "directory",
    default=DEMO_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Study directory.",
)
@_RUN_OPTIONS
def demo(directory: str, quick: bool, jobs: int | None, progress: bool) -> None:
    """The default study: which optimizer keeps accuracy as the batch grows (= `study demo`).

    MNIST-1D, batch 64 to 4,096, SGD, AdamW, LARS, LAMB and ALTO with learning rates
    tuned per batch size; about 8 minutes on 2 idle CPU cores; writes DIRECTORY/report.html.
    """
    _run("demo", directory, quick, jobs, progress)
