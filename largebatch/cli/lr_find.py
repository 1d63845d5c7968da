"""``largebatch lr-find``: the learning-rate range test at a given batch size.

A short run whose rate rises exponentially from ``--start-lr`` to ``--end-lr``
until the smoothed loss blows up (:mod:`largebatch.train.lr_finder`); prints
the suggestions and writes ``lr_find.json`` and ``lr_find.png`` into ``--out``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click

from largebatch.cli.common import (
    SETUP_ERRORS,
    Command,
    batch_options,
    defaults_of,
    device_option,
    error_message,
    optimizer_options,
    shown,
    task_options,
)
from largebatch.train.config import RunConfig
from largebatch.train.lr_finder import RangeTestSettings

DEFAULTS = defaults_of(RunConfig)
SETTINGS = RangeTestSettings()


def range_test_config(options: dict[str, Any], settings: RangeTestSettings) -> RunConfig:
    """The run the range test trains: the options given, at the sweep's first rate."""
    values = {key: value for key, value in options.items() if value is not None}
    batch_size = values.get("batch_size", DEFAULTS["batch_size"])
    name = f"lr-find-{values.get('task', DEFAULTS['task'])}-{values.get('optimizer', DEFAULTS['optimizer'])}"
    default_out = Path("runs") / re.sub(r"[^\w.-]+", "_", f"{name}-b{batch_size}")
    values.setdefault("out_dir", str(default_out))
    return RunConfig.from_dict(
        values
        | {"lr": settings.start_lr, "scaling": "none", "base_batch_size": batch_size}
        | {"steps": settings.steps, "warmup_steps": 0}
    )


@click.command("lr-find", cls=Command)
@task_options(DEFAULTS["task"])
@optimizer_options(DEFAULTS["optimizer"])
@batch_options(DEFAULTS["batch_size"], DEFAULTS["accumulation_steps"])
@click.option("--start-lr", type=float, default=SETTINGS.start_lr, show_default=True)
@click.option("--end-lr", type=float, default=SETTINGS.end_lr, show_default=True)
@click.option(
    "--steps",
    "sweep_steps",
    type=int,
    default=SETTINGS.steps,
    show_default=True,
    help="Steps of the sweep (one rate each).",
)
@click.option(
    "--smoothing",
    type=float,
    default=SETTINGS.smoothing,
    show_default=True,
    help="Moving-average factor of the loss.",
)
@click.option(
    "--blow-up",
    type=float,
    default=SETTINGS.blow_up,
    show_default=True,
    help="Stop when the smoothed loss exceeds this factor times its best.",
)
@click.option("--seed", type=int, help="Random seed." + shown(DEFAULTS["seed"]))
@device_option(DEFAULTS["device"], from_config=True)
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast (for GPUs).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Directory for lr_find.json and lr_find.png."
    + shown("runs/lr-find-<task>-<optimizer>-b<batch>"),
)
def lr_find(
    start_lr: float,
    end_lr: float,
    sweep_steps: int,
    smoothing: float,
    blow_up: float,
    **options: Any,
) -> None:
    """Sweep the learning rate exponentially at one batch size and suggest one.

    Give the batch size you will train with. Exits with status 0 when the suggestions are written, 2 for a bad option (or
    a task whose loss is not finite before training).
    """
    from largebatch.experiments.range_test import check_directory, write_range_test
    from largebatch.train.lr_finder import range_test

    settings = RangeTestSettings(start_lr, end_lr, sweep_steps, smoothing, blow_up)
    config = range_test_config(options, settings)
    check_directory(config.out_dir)
    try:
        result = range_test(config, settings)
    except SETUP_ERRORS as error:
        raise click.UsageError(error_message(error)) from None
    json_path, figure_path = write_range_test(result, config.out_dir)

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    click.echo(
        f"{len(result.lrs)} steps, {rate(result.lrs[0])} to {rate(result.lrs[-1])}; "
        + (
            f"blew up at {rate(result.blow_up_lr)}"
            if result.stopped != "end"
            else "no blow-up (raise --end-lr)"
        )
    )
    click.echo(
        f"suggested learning rate at batch {config.batch_size}: {rate(result.suggested_lr)} "
        f"(minimum / 10), {rate(result.steepest_lr)} (steepest descent)"
    )
    if result.suggested_lr is not None:
        click.echo(
            f"  use: largebatch run --batch-size {config.batch_size} "
            f"--lr {result.suggested_lr:.3g} --base-batch-size {config.batch_size} ..."
        )
    click.echo(f"-> {shlex.quote(str(json_path))}, {shlex.quote(str(figure_path))}")
