"""``largebatch run`` (one training run) and ``largebatch list`` (tasks, optimizers).

Options map one-to-one onto :class:`~largebatch.train.config.RunConfig`; an
option left out keeps the value of ``--config`` (a previous run's
``config.json``) or the RunConfig default. ``--nproc N`` re-launches the same
command through torchrun; under torchrun every process runs it directly.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import click

from largebatch.train.config import RunConfig
from largebatch.train.schedules import DECAYS, SCALING_RULES

DEFAULT_EPOCHS = 10.0
# what a bad config, task or optimizer setting raises before training starts
SETUP_ERRORS = (ValueError, KeyError, ImportError, TypeError)


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


def default_out_dir(config: RunConfig) -> str:
    """``runs/<task>-<optimizer>-b<batch>-s<seed>``, safe as a directory name."""
    name = f"{config.task}-{config.optimizer}-b{config.batch_size}-s{config.seed}"
    return str(Path("runs") / re.sub(r"[^\w.-]+", "_", name))


def build_config(config_file: str | None, options: dict[str, Any]) -> RunConfig:
    """The run's config: ``config_file`` (or defaults) overridden by the given options.

    With ``--resume`` and no ``--config``, the run directory's own ``config.json``
    is the base, so ``largebatch run --out DIR --resume`` continues a run as it was.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if config_file is None:
        config = RunConfig(out_dir="", progress=True)
    else:
        saved = json.loads(Path(config_file).read_text())
        config = RunConfig.from_dict(saved.get("config", saved))
    if given.keys() & {"epochs", "steps", "examples"}:
        config = dataclasses.replace(config, epochs=None, steps=None, examples=None)
    config = dataclasses.replace(config, **given.pop("warmup", {}), **given)
    if (config.epochs, config.steps, config.examples) == (None, None, None):
        config = dataclasses.replace(config, epochs=DEFAULT_EPOCHS)
    if not config.out_dir:
        config = dataclasses.replace(config, out_dir=default_out_dir(config))
    saved_config = Path(config.out_dir) / "config.json"
    if config.resume and config_file is None and saved_config.exists():
        return build_config(str(saved_config), options)
    if "nproc" not in given and "WORLD_SIZE" in os.environ:
        config = dataclasses.replace(config, nproc=int(os.environ["WORLD_SIZE"]))
    return config


def error_message(error: Exception) -> str:
    """An exception's message (``KeyError`` would add quotes)."""
    return str(error.args[0]) if error.args else type(error).__name__


def _check(config: RunConfig) -> None:
    """Every check that can fail before training, as a click error naming the value."""
    from largebatch.tasks import get_task
    from largebatch.train.plan import plan_run, validate

    try:
        validate(config)
        plan_run(config, get_task(config.task, **config.task_options))
    except SETUP_ERRORS as error:
        raise click.UsageError(error_message(error)) from None


@click.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this config.json (e.g. a previous run's); options override it.",
)
@click.option(
    "--task",
    help="Task name (see `largebatch list tasks`) or package.module:function."
    "  [default: mnist1d-cnn]",
)
@click.option(
    "--task-opt",
    "task_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Task option, repeatable (e.g. num_samples=4000).",
)
@click.option(
    "--optimizer", help="Optimizer name (see `largebatch list optimizers`).  [default: sgd]"
)
@click.option(
    "--opt",
    "optimizer_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Optimizer hyperparameter, repeatable (e.g. momentum=0.9).",
)
@click.option("--batch-size", type=int, help="Global batch size.  [default: 64]")
@click.option(
    "--base-batch-size", type=int, help="Batch size at which --lr is given.  [default: 64]"
)
@click.option(
    "--lr", type=float, help="Learning rate at --base-batch-size.  [default: the optimizer's]"
)
@click.option(
    "--scaling",
    type=click.Choice(SCALING_RULES),
    help="How the learning rate grows with the batch.  [default: the optimizer's]",
)
@click.option(
    "--warmup",
    callback=parse_warmup,
    metavar="STEPS|Nep",
    help="Linear warm-up: steps (500) or epochs (2ep).  [default: the optimizer's]",
)
@click.option(
    "--schedule", type=click.Choice(DECAYS), help="Decay after warm-up.  [default: cosine]"
)
@click.option("--decay-power", type=float, help="Exponent of the poly decay.  [default: 1]")
@click.option("--epochs", type=float, help=f"Budget in epochs.  [default: {DEFAULT_EPOCHS:g}]")
@click.option("--steps", type=int, help="Budget in optimizer steps.")
@click.option("--examples", type=int, help="Budget in training examples.")
@click.option(
    "--accumulation-steps",
    type=int,
    help="Micro-batches per step and device (gradient accumulation).  [default: 1]",
)
@click.option("--eval-every", type=int, help="Steps between evaluations.  [default: one epoch]")
@click.option("--eval-batch-size", type=int, help="Evaluation batch per device.")
@click.option(
    "--target",
    callback=parse_target,
    metavar="NAME=VALUE",
    help="Record steps to reach e.g. accuracy=0.95 (or val_accuracy, test_loss...).",
)
@click.option(
    "--stop-at-target/--no-stop-at-target", default=None, help="Stop once the target is reached."
)
@click.option(
    "--checkpoint-every", type=int, help="Steps between checkpoints (always one at the end)."
)
@click.option("--seed", type=int, help="Random seed.  [default: 0]")
@click.option("--nproc", type=int, help="Data-parallel processes on this machine.  [default: 1]")
@click.option("--device", help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast (for GPUs).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Run directory.  [default: runs/<task>-<optimizer>-b<batch>-s<seed>]",
)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue from the run directory's newest checkpoint, if any.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar.  [default: on]")
@click.option(
    "--noise-scale/--no-noise-scale",
    default=None,
    help="Log the gradient noise scale B_simple (free with --nproc >= 2 or "
    "--accumulation-steps >= 2).  [default: when free]",
)
@click.option(
    "--noise-scale-every",
    type=int,
    help="Measure the noise scale on every N-th step.  [default: 10]",
)
def run(config_file: str | None, **options: Any) -> None:
    """Train one model and write its run directory (config, metrics, checkpoints, result)."""
    config = build_config(config_file, options)
    if config.nproc > 1 and "RANK" not in os.environ:
        _check(config)  # before starting the processes
        _launch(config)
        return

    from largebatch.train import train

    try:
        result = train(config)
    except SETUP_ERRORS as error:
        raise click.UsageError(error_message(error)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(result, config.out_dir)
    if result.status == "failed":
        raise SystemExit(1)


def _launch(config: RunConfig) -> None:
    """Re-run this command in ``config.nproc`` processes through torchrun (rank 0 reports)."""
    from largebatch.train.distributed import launch

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump({"config": config.to_dict()}, file)
    try:
        status = launch(config.nproc, ["run", "--config", file.name])
    finally:
        os.unlink(file.name)
    if status != 0:
        raise SystemExit(status)


def _print_summary(result: Any, out_dir: str) -> None:
    parts = [f"{result.status}: {result.steps} steps, {result.examples} examples"]
    for name in ("final_test_accuracy", "final_test_loss"):
        value = getattr(result, name)
        if value is not None:
            parts.append(f"{name.removeprefix('final_')} {value:.4f}")
    if result.steps_to_target is not None:
        parts.append(f"target at step {result.steps_to_target}")
    parts.append(f"{result.wall_time:.1f} s")
    click.echo(", ".join(parts) + f"  ->  {out_dir}")
    if result.error:
        kind = "warning" if result.status == "chance" else "error"
        click.echo(f"{kind}: {result.error}", err=True)
    if result.error_log:
        click.echo(f"traceback: {result.error_log}", err=True)


@click.command("list")
@click.argument("what", type=click.Choice(["tasks", "optimizers"]))
def list_cmd(what: str) -> None:
    """List the registered tasks or optimizers with their defaults."""
    if what == "tasks":
        from largebatch.tasks import list_tasks

        for task in list_tasks():
            options = ", ".join(f"{k}={v!r}" for k, v in task.options.items())
            click.echo(f"{task.name:<22} {task.description}")
            click.echo(f"{'':<22} options: {options or '(none)'}")
        click.echo("\nUser tasks: --task package.module:function (returns a largebatch Task).")
        return

    from largebatch.optim import list_optimizers

    for spec in list_optimizers():
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        click.echo(f"{spec.name:<22} {spec.description}")
        recommended = f"lr scaling: {spec.scaling_rule}, warm-up: {spec.warmup:.0%} of the run"
        if spec.wraps:
            recommended += f", wraps: {spec.wraps}"
        click.echo(f"{'':<22} defaults: {defaults or '(none)'}; {recommended}")
