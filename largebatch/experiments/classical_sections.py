"""Report sections of the classical methods, plugged into :mod:`largebatch.experiments.report`.

The report imports this module (it is listed in ``report.SECTION_MODULES``); each
section shows nothing when no run of the sweep has its data:

* batch growth: each growing-batch run's batch size over the examples it read
  (``metrics.csv``) and where it ended (``RunResult.extra``);
* iterate averaging: the averaged weights' final metrics next to the last iterate's.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from largebatch.experiments.report import Plot, ReportContext, Section, Table, fmt, register_section


def _label(row: dict[str, Any]) -> str:
    """The readable part of a cell id (``sgd-b16-s0-lr0.1-norm-test``)."""
    return row["cell_id"].rsplit("-", 1)[0]


@register_section("batch-growth", order=47)
def batch_growth_section(ctx: ReportContext) -> Section | None:
    """Batch size against examples read, per run with a batch-size controller."""
    rows = [r for r in ctx.rows if r["config"].get("batch_growth")]
    if not rows:
        return None
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    table = []
    for i, row in enumerate(rows):
        curves = ctx.curves(row)
        if "batch_size" in curves:
            ax.step(curves["examples"], curves["batch_size"], where="post", color=f"C{i % 10}",
                    label=_label(row))  # fmt: skip
        config, extra = row["config"], row["extra"]
        table.append(
            [
                _label(row),
                config["batch_growth"],
                fmt(config.get("batch_growth_theta")),
                f"{config['batch_size']:,}",
                f"{extra.get('final_batch_size', 0):,}",
                f"{row['steps']:,}",
                f"{row['examples']:,}",
                fmt(row.get("final_test_accuracy")),
            ]
        )
    ax.set_yscale("log")
    ax.set_xlabel("examples read")
    ax.set_ylabel("batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    text = (
        "Runs whose batch grew under a batch-size controller (`--batch-growth`; "
        "docs/classical.md): the batch size at each evaluation against the examples read "
        "(the exact size of every step is `batch_size_changes` in the run's result). The "
        "norm and inner-product tests grow the batch when the per-example gradient variance "
        "outweighs the squared gradient (`theta`)."
    )
    columns = ["run", "controller", "theta", "first batch", "last batch", "steps", "examples",
               "test accuracy"]  # fmt: skip
    return Section(
        "Batch growth",
        text,
        [Plot("batch_growth", fig, "Batch size against examples read")],
        [Table(columns, table)],
    )


@register_section("averaging", order=48)
def averaging_section(ctx: ReportContext) -> Section | None:
    """The averaged weights' final test metrics next to the last iterate's."""
    rows = [r for r in ctx.rows if r["config"].get("averaging")]
    if not rows:
        return None
    table = []
    for row in rows:
        config = row["config"]
        averaged = row["extra"].get("averaged", {}).get("test", {})
        table.append(
            [
                _label(row),
                config["averaging"],
                f"{config['averaging_start']:,}",
                fmt(config["averaging_decay"]) if config["averaging"] == "ema" else "-",
                fmt(row.get("final_test_loss")),
                fmt(averaged.get("loss")),
                fmt(row.get("final_test_accuracy")),
                fmt(averaged.get("accuracy")),
            ]
        )
    text = (
        "Runs that also evaluated an average of their iterates (`--averaging`; Polyak-Ruppert "
        "from step `start`, or an exponential moving average): the last iterate's test "
        "metrics and the averaged weights' (batch-norm statistics recomputed for them)."
    )
    columns = ["run", "average", "start", "decay", "test loss", "averaged", "test accuracy",
               "averaged"]  # fmt: skip
    return Section("Iterate averaging", text, tables=[Table(columns, table)])
