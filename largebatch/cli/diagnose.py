"""``largebatch diagnose CHECKPOINT``: flatness and curvature of a trained model.

Loads a run (its directory, for the newest checkpoint, or one checkpoint file),
rebuilds its task and model from the run's ``config.json``, measures the
diagnostics of :mod:`largebatch.experiments.checkpoint_diagnostics` on a fixed, seeded training
subset, prints a table and writes ``diagnostics.json`` (atomically) into the
run directory. ``--compare OTHER`` adds the loss and accuracy along the line
between the two runs' weights, and a plot of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from largebatch.cli.common import SETUP_ERRORS, Command, defaults_of, device_option, error_message
from largebatch.experiments.checkpoint_diagnostics import DiagnosticsSettings
from largebatch.train.config import RunConfig

DEFAULTS = DiagnosticsSettings()
#: (flag, DiagnosticsSettings field, help): integer settings, default from the settings class
SETTINGS_OPTIONS = [
    ("--examples", "num_examples", "Size of the seeded training subset (at most the training set)."),
    ("--seed", "seed", "Seeds the subset, start points, subspace and random vectors."),
    ("--subspace-dim", "subspace_dim", "Dimension of the random-subspace sharpness (0: full space only)."),
    ("--k", "k", "Number of top Hessian eigenvalues."),
    ("--probes", "num_probes", "Hutchinson probes for the trace."),
    ("--density-steps", "density_steps", "Lanczos steps of the spectral density."),
    ("--batch-size", "batch_size", "Examples per forward pass."),
]  # fmt: skip


def _names(ctx: click.Context, param: click.Parameter, text: str) -> tuple[str, ...]:
    """``"sharpness,trace"`` -> ``("sharpness", "trace")``; ``"none"`` -> ``()``."""
    names = tuple(item.strip() for item in text.split(",") if item.strip())
    return () if names == ("none",) else names


def _floats(ctx: click.Context, param: click.Parameter, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}") from None


def settings_options(function: Any) -> Any:
    """The :data:`SETTINGS_OPTIONS`, each passed to the command under its field's name."""
    for flag, name, text in reversed(SETTINGS_OPTIONS):
        default = getattr(DEFAULTS, name)
        option = click.option(
            flag, name, type=int, default=default or 0, show_default=True, help=text
        )
        function = option(function)
    return function


@click.command("diagnose", cls=Command)
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--compare",
    "other",
    type=click.Path(exists=True, path_type=Path),
    help="A second run (directory or checkpoint): add the interpolation between the two.",
)
@click.option(
    "--diagnostics",
    "names",
    default=",".join(DEFAULTS.diagnostics),
    show_default=True,
    callback=_names,
    metavar="NAME,...",
    help="Which of sharpness, eigenvalues, trace, density to measure (or none).",
)
@click.option(
    "--epsilons",
    default=",".join(map(str, DEFAULTS.epsilons)),
    show_default=True,
    callback=_floats,
    metavar="EPS,...",
    help="Sharpness box sizes.",
)
@settings_options
@click.option(
    "--train-mode",
    is_flag=True,
    help="Evaluate in train mode (batch statistics, dropout); default eval mode.",
)
@device_option(defaults_of(RunConfig)["device"])
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the JSON.  [default: RUN_DIR/diagnostics.json]",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Interpolation figure (with --compare).  [default: RUN_DIR/interpolation.png]",
)
def diagnose(
    checkpoint: Path,
    other: Path | None,
    names: tuple[str, ...],
    epsilons: tuple[float, ...],
    train_mode: bool,
    device: str,
    out: Path | None,
    plot: Path | None,
    **settings: int,
) -> None:
    """Sharpness, Hessian eigenvalues and trace of the model saved in CHECKPOINT.

    CHECKPOINT is a run directory (its newest checkpoint is used) or a checkpoint
    file in its checkpoints/ folder.
    """
    from largebatch.experiments.checkpoint_diagnostics import (
        DIAGNOSTICS_FILE,
        interpolate_runs,
        load_run,
        run_diagnostics,
    )
    from largebatch.experiments.plots import interpolation_figure
    from largebatch.experiments.report import png_bytes
    from largebatch.utils.atomic import write_bytes_atomic, write_json_atomic

    if not names and other is None:
        raise click.UsageError("Nothing to do: --diagnostics none and no --compare")
    try:
        subspace_dim = settings.pop("subspace_dim") or None
        config = DiagnosticsSettings(
            diagnostics=names, epsilons=epsilons, subspace_dim=subspace_dim,
            train_mode=train_mode, **settings,
        )  # fmt: skip
        run = load_run(checkpoint, device)
        runs = [run] + ([load_run(other, device)] if other is not None else [])
    except SETUP_ERRORS as error:
        raise click.UsageError(error_message(error)) from None

    record = run_diagnostics(run, config)
    if other is not None:
        try:
            interpolation = interpolate_runs(run, runs[1], config)
        except ValueError as error:
            raise click.UsageError(error_message(error)) from None
        record["interpolation"] = {"other_checkpoint": str(runs[1].checkpoint)}
        record["interpolation"].update(interpolation.to_dict())
        plot = plot or run.run_dir / "interpolation.png"
        figure = interpolation_figure(
            interpolation.to_dict(), f"A: {run.run_dir.name}", f"B: {runs[1].run_dir.name}"
        )
        write_bytes_atomic(plot, png_bytes(figure))
    out = out or run.run_dir / DIAGNOSTICS_FILE
    write_json_atomic(out, record)
    click.echo(format_record(record))
    if other is not None:
        click.echo(f"interpolation plot: {plot}")
    click.echo(f"saved: {out}")


def _g(value: float) -> str:
    return f"{value:.4g}"


def format_record(record: dict[str, Any]) -> str:
    """The table ``largebatch diagnose`` prints for a diagnostics record."""
    settings = record["settings"]
    subset = record["subset"]
    mode = "train" if settings["train_mode"] else "eval"
    measured = ", ".join(f"{name} {_g(value)}" for name, value in subset.items())
    lines = [
        f"{record['run_dir']}  step {record['step']}  ({record['checkpoint']})",
        f"{record['num_examples']} training examples (seed {settings['seed']}), "
        f"{mode} mode: {measured}",
        "",
    ]
    rows = [("diagnostic", "value", "detail", "time")]
    times = record["wall_time_s"]
    for result in record.get("sharpness", []):
        space = "full space" if result["subspace_dim"] is None else f"p={result['subspace_dim']}"
        rows.append((
            f"sharpness, {space}, eps={result['epsilon']:g}", _g(result["sharpness"]),
            f"max loss {_g(result['max_loss'])} ({result['num_iterations']} L-BFGS-B iterations)",
            f"{result['wall_time_s']:.1f} s",
        ))  # fmt: skip
    if "eigenvalues" in record:
        eig = record["eigenvalues"]
        state = "converged" if eig["converged"] else "NOT converged"
        rows.append((
            f"top {len(eig['eigenvalues'])} Hessian eigenvalue(s)", _g(eig["eigenvalues"][0]),
            f"{', '.join(map(_g, eig['eigenvalues']))} ({state}, {eig['num_products']} products)",
            f"{times['eigenvalues']:.1f} s",
        ))  # fmt: skip
    if "trace" in record:
        trace = record["trace"]
        rows.append((
            "Hessian trace", _g(trace["trace"]),
            f"{trace['confidence']:.0%} CI {_g(trace['ci_low'])} to {_g(trace['ci_high'])} "
            f"({trace['num_products']} probes)",
            f"{times['trace']:.1f} s",
        ))  # fmt: skip
    if "density" in record:
        nodes = [x for run in record["density"]["nodes"] for x in run]
        rows.append((
            "spectral density", "-",
            f"Ritz values {_g(min(nodes))} to {_g(max(nodes))} (nodes, weights in the JSON)",
            f"{times['density']:.1f} s",
        ))  # fmt: skip
    if "interpolation" in record:
        alphas = record["interpolation"]["alphas"]
        for split, curves in record["interpolation"]["curves"].items():
            losses = dict(zip(alphas, curves["loss"]))
            peak_alpha = max((a for a in alphas if 0 <= a <= 1), key=losses.get)
            rows.append((
                f"interpolation A->B, {split} loss", "-",
                f"A {_g(losses[0.0])}, B {_g(losses[1.0])}, highest between "
                f"{_g(losses[peak_alpha])} at alpha {peak_alpha:.3g}",
                "",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
