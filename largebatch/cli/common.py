"""What the commands share: the error style, value parsers and option blocks.

Errors: a command built with ``cls=Command`` prints the library's errors
(:mod:`largebatch.utils.errors`) as one line, never a traceback: a bad value
or name is a usage error (exit status 2), anything else (a directory in use, an
unusable checkpoint or database) an error (exit status 1).

Options that several commands take are defined once here; their help shows the
default of the config they fill in, read from the config class itself.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from largebatch.utils.errors import ConfigError, LargeBatchError, UnknownNameError

#: built-in exceptions that, raised while a run is set up, are about what the user gave
#: (an optimizer's constructor, a user task that cannot be imported)
SETUP_ERRORS = (ValueError, KeyError, ImportError, TypeError)


def error_message(error: Exception) -> str:
    """An exception's message (``KeyError`` would add quotes)."""
    return str(error.args[0]) if error.args else type(error).__name__


class Command(click.Command):
    """A click command that prints the library's errors, and its warnings, as one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (ConfigError, UnknownNameError) as error:
                raise click.UsageError(error_message(error), ctx) from None
            except LargeBatchError as error:
                raise click.ClickException(error_message(error)) from None


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {message}", err=True)


def defaults_of(cls: type) -> dict[str, Any]:
    """Field name -> default of a dataclass (what a left-out option means)."""
    return {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(cls)
        if f.default is not MISSING or f.default_factory is not MISSING
    }


def shown(value: Any) -> str:
    """The ``[default: ...]`` suffix of a help text."""
    return f"  [default: {value}]"


def compose(*decorators: Callable) -> Callable:
    """Apply several click decorators as one (listed in the order they appear in --help)."""

    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


# --- value parsers ---------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line value as a Python literal (``0.9``, ``True``, ``(0.9, 0.99)``) or a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(lowered)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]) -> dict | None:
    """``KEY=VALUE`` items -> dict; ``None`` when the option was not given."""
    if not items:
        return None
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        pairs[key.strip()] = parse_value(value)
    return pairs


def parse_list(ctx: click.Context, param: click.Parameter, text: str | None) -> list | None:
    """``"64,256,full"`` -> ``[64, 256, "full"]`` (types are checked by what uses them)."""
    if text is None:
        return None
    return [parse_value(item) for item in text.split(",") if item.strip()]


def parse_target(ctx: click.Context, param: click.Parameter, text: str | None):
    """``accuracy=0.95`` -> ``("accuracy", 0.95)``."""
    if text is None:
        return None
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        pass
    raise click.BadParameter(f"expected NAME=VALUE with a number, got {text!r}", ctx, param)


def parse_warmup(ctx: click.Context, param: click.Parameter, text: str | None) -> dict | None:
    """``"500"`` -> 500 warm-up steps; ``"2ep"`` or ``"0.5ep"`` -> warm-up in epochs."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(ep|epochs?)?\s*", text)
    if match is None or (match[2] is None and "." in match[1]):
        raise click.BadParameter(
            f"{text!r} is neither a number of steps (500) nor of epochs (2ep)", ctx, param
        )
    if match[2] is None:
        return {"warmup_steps": int(match[1]), "warmup_epochs": None}
    return {"warmup_steps": None, "warmup_epochs": float(match[1])}


# --- option blocks -----------------------------------------------------------------------


def task_options(default_task: str) -> Callable:
    """``--task`` and ``--task-opt`` (``task_options``)."""
    return compose(
        click.option(
            "--task",
            help="Task name (see `largebatch list tasks`) or package.module:function."
            + shown(default_task),
        ),
        click.option(
            "--task-opt",
            "task_options",
            multiple=True,
            metavar="KEY=VALUE",
            callback=parse_pairs,
            help="Task option, repeatable (e.g. num_samples=4000).",
        ),
    )


def optimizer_options(default_optimizer: str) -> Callable:
    """``--optimizer`` and ``--opt`` (``optimizer_options``)."""
    return compose(
        click.option(
            "--optimizer",
            help="Optimizer name (see `largebatch list optimizers`)." + shown(default_optimizer),
        ),
        click.option(
            "--opt",
            "optimizer_options",
            multiple=True,
            metavar="KEY=VALUE",
            callback=parse_pairs,
            help="Optimizer hyperparameter, repeatable (e.g. momentum=0.9).",
        ),
    )


def batch_options(default_batch_size: int, default_accumulation_steps: int) -> Callable:
    """``--batch-size`` and ``--accumulation-steps`` of one run."""
    return compose(
        click.option(
            "--batch-size", type=int, help="Global batch size." + shown(default_batch_size)
        ),
        click.option(
            "--accumulation-steps",
            type=int,
            help="Micro-batches per step and device (gradient accumulation)."
            + shown(default_accumulation_steps),
        ),
    )


def budget_options(default_epochs: float) -> Callable:
    """``--epochs`` and ``--steps``: the budget of a run (epochs unless steps are given)."""
    return compose(
        click.option(
            "--epochs", type=float, help="Budget in epochs." + shown(f"{default_epochs:g}")
        ),
        click.option("--steps", type=int, help="Budget in optimizer steps."),
    )


def target_option(default: str) -> Callable:
    """``--target NAME=VALUE``: what steps-to-target counts to."""
    return click.option(
        "--target",
        callback=parse_target,
        metavar="NAME=VALUE",
        help="Record steps to reach e.g. accuracy=0.95 (or val_accuracy, test_loss...)."
        + shown(default),
    )


def nproc_option(default: int) -> Callable:
    return click.option(
        "--nproc",
        type=int,
        help="Data-parallel processes per run on this machine." + shown(default),
    )


def progress_option(default: bool, *, from_config: bool = False) -> Callable:
    """``--progress/--no-progress``, on or off as ``default``; with ``from_config`` a
    left-out option is ``None`` and the config's value (``default`` unless a file sets it)
    stays."""
    return click.option(
        "--progress/--no-progress",
        default=None if from_config else default,
        help="Progress bar." + shown("on" if default else "off"),
    )


def device_option(default: str, *, from_config: bool = False) -> Callable:
    """``--device``; with ``from_config`` a left-out option is ``None`` and the config's stays."""
    return click.option(
        "--device",
        default=None if from_config else default,
        help="auto, cpu, cuda or cuda:N." + shown(default),
    )


def jobs_option(default: int | None) -> Callable:
    """``--jobs``: runs in parallel, in separate processes; ``None``: :func:`default_jobs`."""
    return click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=default,
        help="Runs in parallel (separate processes)."
        + shown(default if default is not None else "the number of CPU cores, at most 4"),
    )


def default_jobs() -> int:
    """Runs in parallel when ``--jobs`` is left to the command: the cores, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


# --- outcomes of many runs ----------------------------------------------------------------

#: the statuses of runs that give no result, as a warning names their runs
PROBLEMS = {"diverged": "diverged", "chance": "stayed at chance level", "failed": "failed"}


def _problems(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {s: [r for r in rows if r["status"] == s] for s in PROBLEMS}


def warn_problems(rows: Sequence[dict[str, Any]], directory: str | Path) -> None:
    """A warning on stderr counting the runs that diverged, stayed at chance level or failed.

    Chance-level runs finished without an error, so each is named with its reason.
    """
    bad = _problems(rows)
    if not any(bad.values()):
        return
    counts = ", ".join(f"{len(v)} {PROBLEMS[s]}" for s, v in bad.items() if v)
    click.echo(f"warning: {counts} (see `largebatch results {directory}`)", err=True)
    for row in bad["chance"]:
        click.echo(f"  {row['cell_id']}: {row['error']}", err=True)


def fail_without_results(rows: Sequence[dict[str, Any]], directory: str | Path) -> None:
    """Exit with status 1 if there are runs and none of them finished normally ("done")."""
    if not rows or any(row["status"] == "done" for row in rows):
        return
    bad = _problems(rows)
    counts = ", ".join(f"{len(v)} {PROBLEMS[s]}" for s, v in bad.items() if v)
    raise click.ClickException(
        f"No run has a result: every run failed, diverged or stayed at chance level ({counts}); "
        f"the reasons: `largebatch results {directory} --columns cell_id,status,error`"
    )
