"""Pieces the studies' report sections share: numbers as text, the tuning table, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
from matplotlib.figure import Figure

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import STATUSES, Table, add_legend, batch_size_axis, fmt
from largebatch.experiments.studies.base import PartResults
from largebatch.experiments.sweep_config import series_name
from largebatch.optim.registry import get_spec

#: how a point none of whose runs finished normally is shown
FLAGS = {"diverged": "diverged", "chance": "at chance", "failed": "failed"}


def flag(point: Point) -> str | None:
    """``None`` if some run of ``point`` finished normally, else why none did ("at chance", ...)."""
    if "done" in point.statuses:
        return None
    counts = {s: point.statuses.count(s) for s in STATUSES if s in point.statuses}
    return " / ".join(FLAGS[s] for s in counts)


def mean_std(
    values: Sequence[float] | np.ndarray, scale: float = 100.0, digits: int | None = 1
) -> str:
    """``"97.3 ± 0.4"`` (sample std over seeds), ``"97.3"`` for one value, ``"-"`` for none.

    ``digits`` decimals, or three significant digits if ``None`` (for values
    spanning orders of magnitude, like sharpness).
    """
    values = np.asarray(values, dtype=float) * scale
    if values.size == 0:
        return "-"
    spec = f".{digits}f" if digits is not None else ".3g"
    if values.size == 1:
        return f"{values[0]:{spec}}"
    return f"{values.mean():{spec}} ± {values.std(ddof=1):{spec}}"


def accuracy_text(point: Point | None, key: str = "final_test_accuracy") -> str:
    """Mean ± std of ``key`` in percent over the seeds that finished, or the point's flag.

    Seeds that did not finish normally are counted: ``"96.1 ± 0.2 (1 of 3 at chance)"``.
    """
    if point is None:
        return ""
    flagged = flag(point)
    if flagged is not None:
        return flagged
    text = mean_std(point.values(key))
    bad = [s for s in point.statuses if s != "done"]
    if bad:
        text += f" ({len(bad)} of {len(point.statuses)} {FLAGS[bad[0]]})"
    return text


def text_table(table: Table, title: str = "") -> str:
    """A table as aligned plain text (the summary ``largebatch study`` prints)."""
    rows = [table.columns, *table.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(table.columns))]
    lines = [title] if title else []
    for row in rows:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def tuning_table(part: PartResults) -> Table | None:
    """Per series (optimizer, topology) and batch size: the learning rates tried, the one
    chosen, how it ended."""
    states = part.states
    if not states:
        return None
    points = {(p.series, p.batch_size): p for p in part.report.points}
    rows = []
    for (optimizer, topology, batch_size), state in states.items():
        series = series_name(optimizer, topology)
        point = points.get((series, batch_size))
        if state is None:
            tried, chosen, note = "-", fmt(point.lr) if point else "-", "one learning rate"
        elif not state.settled:
            tried, chosen, note = f"{len(state.grid)} so far", "-", "tuning unfinished"
        else:
            tried = f"{len(state.grid)}: {fmt(state.grid[0])} … {fmt(state.grid[-1])}"
            chosen = fmt(state.chosen)
            note = f"{state.extensions} added" if state.extensions else "interior"
            if state.at_edge:
                note = f"at the {state.at_edge} edge after {state.extensions} added"
        used = point.runs[0]["extra"].get("lr") if point and point.runs else None
        seeds = str(len(point.runs)) if point else "0"
        rows.append([series, f"{batch_size:,}", tried, chosen, fmt(used), note, seeds])
    columns = [
        "optimizer", "batch", "base lrs tried", "chosen", "lr used at this batch",
        "grid", "seeds",
    ]  # fmt: skip
    return Table(columns, rows)


#: how each scaling rule reads in the tuning text
RULES = {"linear": "linear", "sqrt": "square root", "none": "none: the same rate at every batch"}


def target_text(target: Sequence) -> str:
    """``("accuracy", 0.9)`` as "validation accuracy ≥ 0.9" (a split prefix names the split)."""
    split, _, metric = str(target[0]).partition("_")
    if split not in ("train", "val", "test") or not metric:
        split, metric = "val", str(target[0])
    name = {"train": "training", "val": "validation", "test": "test"}[split]
    return f"{name} {metric} {'≤' if metric == 'loss' else '≥'} {target[1]:g}"


def tuning_text(part: PartResults) -> str:
    """How the part's learning rates were chosen, from its sweep file and tuning protocol:
    the criterion, the extensions at an edge, the seeds, the scaling rule per optimizer."""
    spec, protocol = part.factory.spec, part.protocol
    if spec.stop_at_target and spec.target is not None:
        criterion = f"the fewest steps to the target ({target_text(spec.target)})"
        split = "training" if str(spec.target[0]).startswith("train_") else "validation"
    else:
        criterion, split = "the best final validation accuracy", "validation"
    extensions = getattr(protocol, "max_extensions", 0)
    edges = [
        f"{series_name(o, t)} at {b:,} ({state.at_edge})"
        for (o, t, b), state in part.states.items()
        if state is not None and state.settled and state.at_edge
    ]
    if edges:
        value = "value stayed" if len(edges) == 1 else "values stayed"
        edge = f"; {len(edges)} chosen {value} at the edge after {extensions} added: "
        edge += ", ".join(edges)
    else:
        edge = "; every chosen value ended interior"
    seeds_from = getattr(protocol, "seeds_from", None)
    seeds = f" (at batch sizes ≥ {seeds_from:,})" if seeds_from else ""
    rules: dict[str, list[str]] = {}
    for optimizer in spec.optimizers:
        section = spec.optimizer_settings.get(optimizer, {})
        rule = section.get("scaling") or spec.scaling or get_spec(optimizer).scaling_rule
        rules.setdefault(rule, []).append(optimizer)
    if set(rules) == {"none"}:
        scaling = "Learning rates are used as given at every batch size (no scaling rule)."
    else:
        by_rule = "; ".join(f"{RULES[r]} for {', '.join(o)}" for r, o in rules.items())
        scaling = (
            f"Base learning rates are given at batch {spec.base_batch_size:,} and scaled to "
            f"each batch size by the optimizer's rule ({by_rule})."
        )
    limit = f"at most {extensions} value{'s' if extensions != 1 else ''}"
    return (
        "Learning rates were tuned per optimizer and batch size (Shallue et al. 2019): the "
        f"sweep file's log-spaced grid ran with the first seed and the value with {criterion} "
        f"won, on the {split} split; a best value at the edge of the grid extended it by the "
        f"grid's own ratio, {limit} added{edge}. The other seeds then ran at the chosen "
        f"value{seeds}. {scaling} The test split never took part in any choice."
    )


def train_test_figure(part: PartResults, title: str) -> Figure:
    """Final test (solid) and training (dashed) accuracy vs batch size, one colour per series.

    Points none of whose runs finished normally are marked × on the bottom axis.
    """
    ctx = part.report
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    lost = []
    for series, pts in ctx.series.items():
        color = ctx.colors[series]
        ok = [p for p in pts if flag(p) is None]
        b = [p.batch_size for p in ok]
        test = np.array([p.mean("final_test_accuracy") for p in ok]) * 100
        ax.plot(b, test, "o-", color=color, label=series)
        train = [100 * p.mean("final_train_accuracy") for p in ok]
        ax.plot(b, train, "--", color=color, linewidth=1, alpha=0.8)
        if any(len(p.values("final_test_accuracy")) > 1 for p in ok):
            low, high = (np.array([p.spread("final_test_accuracy")[i] for p in ok]) * 100
                         for i in (0, 1))  # fmt: skip
            ax.fill_between(b, low, high, color=color, alpha=0.2, linewidth=0)
        lost += [(p.batch_size, color) for p in pts if flag(p) is not None]
    bottom = ax.get_ylim()[0]
    for batch_size, color in lost:
        ax.plot([batch_size], [bottom], "x", color=color, markersize=9, clip_on=False)
    ax.plot([], [], "--", color="0.3", linewidth=1, label="training accuracy")
    if lost:
        ax.plot([], [], "x", color="0.3", label="diverged / at chance")
    batch_size_axis(ax, ctx.batch_sizes)
    ax.set_ylabel("final accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    add_legend(ax, loc="lower left")
    return fig


def seconds_per_step(point: Point) -> float:
    """Median over seeds of a run's wall time over its steps (evaluations included)."""
    times = [r["wall_time"] / r["steps"] for r in point.runs if r["steps"] and r["wall_time"]]
    return float(np.median(times)) if times else math.nan


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def difference(a: Point | None, b: Point | None, key: str = "final_test_accuracy") -> dict:
    """``a - b`` of the mean of ``key`` in points, its standard error and Welch's p-value."""
    if a is None or b is None or flag(a) is not None or flag(b) is not None:
        return {"diff": math.nan, "se": math.nan, "p": math.nan}
    x, y = a.values(key) * 100, b.values(key) * 100
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return {"diff": diff, "se": math.nan, "p": math.nan}
    se = float(np.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size))
    p = float(scipy.stats.ttest_ind(x, y, equal_var=False).pvalue) if se > 0 else math.nan
    return {"diff": diff, "se": se, "p": p}


def signed(d: dict) -> str:
    if math.isnan(d["diff"]):
        return "-"
    text = f"{d['diff']:+.2f}"
    if not math.isnan(d["se"]):
        text += f" ± {d['se']:.2f}"
    if not math.isnan(d["p"]):
        text += f" (p = {d['p']:.2g})"
    return text


def accuracy_table(part: PartResults, columns_label: str = "optimizer") -> Table:
    """Series x batch sizes: mean ± std test accuracy over seeds (or the flag)."""
    ctx = part.report
    rows = []
    for series, pts in ctx.series.items():
        by_batch = {p.batch_size: p for p in pts}
        rows.append([series, *(accuracy_text(by_batch.get(b)) for b in ctx.batch_sizes)])
    return Table([columns_label, *(f"{b:,}" for b in ctx.batch_sizes)], rows)
