"""``largebatch run`` (one training run) and ``largebatch list`` (tasks, optimizers).

Options map one-to-one onto :class:`~largebatch.train.config.RunConfig`; an
option left out keeps the value of ``--config`` (a previous run's
``config.json``) or the RunConfig default, which the help shows. ``--nproc N``
starts N worker processes (:func:`largebatch.train.launch`); under a torchrun
started by the user, every process runs the command directly.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

import click

from largebatch.cli.common import (
    SETUP_ERRORS,
    Command,
    batch_options,
    budget_options,
    defaults_of,
    device_option,
    error_message,
    nproc_option,
    optimizer_options,
    parse_pairs,
    parse_warmup,
    progress_option,
    shown,
    target_option,
    task_options,
)
from largebatch.train.autowu import AUTOWU_DECAYS
from largebatch.train.averaging import KINDS as AVERAGING_KINDS
from largebatch.train.batch_growth import CONTROLLERS
from largebatch.train.config import DEFAULT_EPOCHS, RunConfig
from largebatch.train.schedules import SCALINGS, SCHEDULES

DEFAULTS = defaults_of(RunConfig)
BUDGETS = ("epochs", "steps", "examples")
#: what a run without ``--config`` starts from, over the RunConfig defaults
NEW_RUN = {"progress": True}


def default_out_dir(values: dict[str, Any]) -> str:
    """``runs/<task>-<optimizer>-b<batch>-s<seed>``, safe as a directory name."""
    values = {**DEFAULTS, **values}
    name = f"{values['task']}-{values['optimizer']}-b{values['batch_size']}-s{values['seed']}"
    return str(Path("runs") / re.sub(r"[^\w.-]+", "_", name))


def read_config_file(path: str) -> dict[str, Any]:
    """The fields of a ``--config`` file (a run's ``config.json``), checked."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise click.UsageError(f"Cannot read {path}: {error.strerror}") from None
    return RunConfig.from_json(text, path).to_dict()


def build_config(config_file: str | None, options: dict[str, Any]) -> RunConfig:
    """The run's config: ``config_file`` (or the defaults) overridden by the given options.

    With ``--resume`` and no ``--config``, the run directory's own ``config.json``
    is the base, so ``largebatch run --out DIR --resume`` continues a run as it was.
    """
    given = {key: value for key, value in options.items() if value is not None}
    given.update(given.pop("warmup", {}))
    preset = given.pop("preset", None)
    if "nproc" not in given and "WORLD_SIZE" in os.environ:  # under the user's torchrun
        given["nproc"] = int(os.environ["WORLD_SIZE"])
    values = dict(NEW_RUN) if config_file is None else read_config_file(config_file)
    if given.keys() & set(BUDGETS):
        values.update(dict.fromkeys(BUDGETS))
    if preset is not None:
        from largebatch.train.presets import apply_preset

        given = apply_preset(preset, given)
    values.update(given)
    values["out_dir"] = values.get("out_dir") or default_out_dir(values)
    saved = Path(values["out_dir"]) / "config.json"
    if config_file is None and values.get("resume") and saved.exists():
        return build_config(str(saved), {**options, "out_dir": values["out_dir"]})
    return RunConfig.from_dict(values)


@click.command("run", cls=Command)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this config.json (e.g. a previous run's); options override it.",
)
@task_options(DEFAULTS["task"])
@click.option(
    "--preset",
    help="A published recipe (see `largebatch list presets`); other options override it.",
)
@optimizer_options(DEFAULTS["optimizer"])
@batch_options(DEFAULTS["batch_size"], DEFAULTS["accumulation_steps"])
@click.option(
    "--base-batch-size",
    type=int,
    help="Batch size at which --lr is given." + shown(DEFAULTS["base_batch_size"]),
)
@click.option(
    "--lr", type=float, help="Learning rate at --base-batch-size." + shown("the optimizer's")
)
@click.option(
    "--scaling",
    type=click.Choice(SCALINGS),
    help="How the learning rate grows with the batch (adascale: by the gain measured "
    "each step)." + shown("the optimizer's"),
)
@click.option(
    "--warmup",
    callback=parse_warmup,
    metavar="STEPS|Nep",
    help="Linear warm-up: steps (500) or epochs (2ep)." + shown("the optimizer's"),
)
@click.option(
    "--warmup-start",
    type=float,
    help="Fraction of the peak rate the warm-up starts from." + shown(DEFAULTS["warmup_start"]),
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    help="Decay after warm-up, or autowu (warm-up and peak found during the run)."
    + shown(DEFAULTS["schedule"]),
)
@click.option(
    "--decay-power",
    type=float,
    help="Exponent of the poly decay." + shown(f"{DEFAULTS['decay_power']:g}"),
)
@click.option(
    "--decay-floor",
    type=float,
    help="Fraction of the peak rate the decay ends at." + shown(DEFAULTS["decay_floor"]),
)
@click.option(
    "--autowu-min-lr",
    type=float,
    help="AutoWU: rate its warm-up starts from." + shown(f"{DEFAULTS['autowu_min_lr']:g}"),
)
@click.option(
    "--autowu-max-lr",
    type=float,
    help="AutoWU: rate its warm-up reaches at the cap." + shown(f"{DEFAULTS['autowu_max_lr']:g}"),
)
@click.option(
    "--autowu-max-warmup",
    type=float,
    help="AutoWU: cap on the warm-up, a fraction of the run in (0, 1]."
    + shown(DEFAULTS["autowu_max_warmup"]),
)
@click.option(
    "--autowu-decay",
    type=click.Choice(AUTOWU_DECAYS),
    help="AutoWU: decay after the warm-up." + shown(DEFAULTS["autowu_decay"]),
)
@budget_options(DEFAULT_EPOCHS)
@click.option("--examples", type=int, help="Budget in training examples.")
@click.option("--eval-every", type=int, help="Steps between evaluations." + shown("one epoch"))
@click.option(
    "--eval-batch-size", type=int, help="Evaluation batch per device." + shown("the micro-batch")
)
@target_option("the task's")
@click.option(
    "--stop-at-target/--no-stop-at-target", default=None, help="Stop once the target is reached."
)
@click.option(
    "--checkpoint-every", type=int, help="Steps between checkpoints (always one at the end)."
)
@click.option("--seed", type=int, help="Random seed." + shown(DEFAULTS["seed"]))
@nproc_option(DEFAULTS["nproc"])
@click.option(
    "--topology",
    help="Graph a decentralized optimizer (dmsgd, decentlam) gossips over: ring, exp, "
    "one-peer-exp or complete (see `largebatch list topologies`)." + shown("the optimizer's"),
)
@device_option(DEFAULTS["device"], from_config=True)
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast (for GPUs).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Run directory." + shown("runs/<task>-<optimizer>-b<batch>-s<seed>"),
)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue from the run directory's newest checkpoint, if any.",
)
@progress_option(NEW_RUN["progress"], from_config=True)
@click.option(
    "--noise-scale/--no-noise-scale",
    default=None,
    help="Log the gradient noise scale B_simple (free with --nproc >= 2 or "
    "--accumulation-steps >= 2)." + shown("when free"),
)
@click.option(
    "--noise-scale-every",
    type=int,
    help="Measure the noise scale on every N-th step." + shown(DEFAULTS["noise_scale_every"]),
)
@click.option(
    "--hessian-batch-size",
    type=int,
    help="Hessian sample of newton-cg and sqn (at most the batch: its first examples; "
    "larger: an independent sample)." + shown("the batch"),
)
@click.option(
    "--batch-growth",
    type=click.Choice(sorted(CONTROLLERS)),
    help="Grow the batch from --batch-size during training with this controller.",
)
@click.option(
    "--batch-growth-theta",
    type=float,
    help="theta of the norm and inner-product tests (smaller: larger batches)."
    + shown("the controller's"),
)
@click.option(
    "--batch-growth-opt",
    "batch_growth_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Batch-growth option, repeatable (e.g. every=4, group_size=4, factor=2).",
)
@click.option(
    "--max-batch-size", type=int, help="Largest batch of --batch-growth." + shown("the data")
)
@click.option(
    "--averaging",
    type=click.Choice(AVERAGING_KINDS),
    help="Also evaluate an average of the iterates (avg_* columns).",
)
@click.option(
    "--averaging-start",
    type=int,
    help="Steps before averaging begins." + shown(DEFAULTS["averaging_start"]),
)
@click.option(
    "--averaging-decay",
    type=float,
    help="EMA factor of --averaging ema." + shown(DEFAULTS["averaging_decay"]),
)
def run(config_file: str | None, **options: Any) -> None:
    """Train one model and write its run directory (config, metrics, checkpoints, result).

    Exits with status 0 when the run is done, 1 when it failed, diverged or ended
    at chance level (the reason is printed and kept in result.json), 2 for a bad
    option.
    """
    from largebatch.train import launch, train
    from largebatch.train.run_dir import read_result

    config = build_config(config_file, options)
    started = time.time()
    try:
        if config.nproc > 1 and "RANK" not in os.environ:
            status = launch(config)
            result = read_result(config.out_dir, since=started)
            if result is None:
                raise click.ClickException(
                    f"The {config.nproc} workers exited with status {status} without a result "
                    "(their messages are above)"
                )
        else:
            result = train(config)
    except SETUP_ERRORS as error:
        raise click.UsageError(error_message(error)) from None
    except KeyboardInterrupt:
        click.echo(interrupted_message(config.out_dir), err=True)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(result, config.out_dir)
    if result.status != "done":
        raise SystemExit(1)


def interrupted_message(out_dir: str) -> str:
    """What an interrupted run has kept, and the command that continues it."""
    from largebatch.train.checkpoint import list_checkpoints

    directory = Path(out_dir)
    resume = f"largebatch run --out {shlex.quote(out_dir)} --resume"
    if not (directory / "config.json").exists():
        return "Interrupted before the run started; nothing was written."
    checkpoints = list_checkpoints(directory / "checkpoints")
    if not checkpoints:
        return f"Interrupted before the first checkpoint; start the run again with:\n  {resume}"
    return (
        f"Interrupted. The checkpoints are kept in {directory / 'checkpoints'} (newest: "
        f"{checkpoints[-1].name}); continue the run with:\n  {resume}"
    )


def _print_summary(result: Any, out_dir: str) -> None:
    parts = [f"{result.status}: {result.steps} steps, {result.examples} examples"]
    for name in ("final_test_accuracy", "final_test_loss"):
        value = getattr(result, name)
        if value is not None:
            parts.append(f"{name.removeprefix('final_')} {value:.4f}")
    if result.steps_to_target is not None:
        parts.append(f"target at step {result.steps_to_target}")
    if result.extra.get("autowu_switch_step") is not None:
        parts.append(
            f"AutoWU peak {result.extra['autowu_peak_lr']:.3g} from step "
            f"{result.extra['autowu_switch_step']}"
        )
    parts.append(f"{result.wall_time:.1f} s")
    click.echo(", ".join(parts) + f"  ->  {out_dir}")
    if result.error:
        click.echo(f"error: {result.error}", err=True)
    if result.error_log:
        click.echo(f"traceback: {result.error_log}", err=True)


@click.command("list")
@click.argument("what", type=click.Choice(["tasks", "optimizers", "topologies", "presets"]))
def list_cmd(what: str) -> None:
    """List the registered tasks, optimizers, topologies or recipes (presets)."""
    if what == "topologies":
        from largebatch.optim.decentralized import TOPOLOGIES

        for name, topology in TOPOLOGIES.items():
            click.echo(f"{name:<22} {topology.description}")
        click.echo(
            "\nFor the decentralized optimizers (--optimizer dmsgd|decentlam --topology NAME)."
        )
        return
    if what == "presets":
        from largebatch.train.presets import PRESETS

        for preset in PRESETS.values():
            click.echo(f"{preset.name:<22} {preset.description}")
            click.echo(f"{'':<22} source: {preset.reference}")
        return
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
