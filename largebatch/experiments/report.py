"""The report of a sweep: ``report.html`` (self-contained) and ``report.md`` (+ PNGs).

A report is a list of sections, each built by a function registered with
:func:`register_section`. The core sections (overview, accuracy, generalization
gap, steps-to-target and critical batch size, loss curves, results table) are
defined here; the modules named in :data:`SECTION_MODULES` (the diagnostics'
sections) register theirs when :func:`report` imports them, and user code adds
its own by calling :func:`register_section` before :func:`report` runs. A
section function receives a :class:`ReportContext` and returns a
:class:`Section`, or ``None`` when it has nothing to show.
"""

from __future__ import annotations

import base64
import csv
import html
import importlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from largebatch.experiments import analysis
from largebatch.experiments.results_store import ResultsStore
from largebatch.utils.atomic import write_bytes_atomic, write_text_atomic
from largebatch.utils.errors import ConfigError

FIGURES_DIR = "figures"
#: modules whose sections the report shows besides the core ones; each imports this
#: module and calls :func:`register_section`, so they are imported when a report is made
SECTION_MODULES = (
    "largebatch.experiments.diagnostics_sections",
    "largebatch.experiments.schedule_sections",
    "largebatch.experiments.classical_sections",
)
#: run statuses, in the order tables list them ("chance": training loss stayed at chance level)
STATUSES = ("done", "diverged", "chance", "failed")


@dataclass
class Table:
    """A table: header and rows of already-formatted cells."""

    columns: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    """A figure of a section, saved as ``figures/<stem>.png``."""

    stem: str
    figure: Figure
    caption: str


@dataclass
class Section:
    """One part of the report. ``text`` is Markdown paragraphs (``**bold**``, `` `code` ``, links)."""

    title: str
    text: str = ""
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class ReportContext:
    """What section functions read: the sweep's rows, points and run directories."""

    sweep_dir: Path
    rows: list[dict[str, Any]]

    @cached_property
    def points(self) -> list[analysis.Point]:
        return analysis.points(self.rows)

    @cached_property
    def series(self) -> dict[str, list[analysis.Point]]:
        return analysis.by_series(self.points)

    @cached_property
    def colors(self) -> dict[str, Any]:
        """One colour per series, the same in every figure."""
        palette = matplotlib.colormaps["tab10"].colors
        return {s: palette[i % len(palette)] for i, s in enumerate(self.series)}

    @cached_property
    def batch_sizes(self) -> list[int]:
        return sorted({p.batch_size for p in self.points})

    def run_dir(self, row: dict[str, Any]) -> Path:
        return self.sweep_dir / row["run_dir"]

    def run_config(self, row: dict[str, Any]) -> dict[str, Any]:
        """The run's ``config.json`` (config, resolved plan, versions), or ``{}``."""
        try:
            return json.loads((self.run_dir(row) / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    def curves(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """Columns of the run's ``metrics.csv`` as float arrays (``{}`` if absent)."""
        try:
            with open(self.run_dir(row) / "metrics.csv", newline="") as file:
                records = list(csv.DictReader(file))
        except OSError:
            return {}
        if not records:
            return {}
        return {key: np.array([_to_float(r[key]) for r in records]) for key in records[0] if key}


def _to_float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


SectionBuilder = Callable[[ReportContext], "Section | None"]
_SECTIONS: list[tuple[float, str, SectionBuilder]] = []


def register_section(name: str, order: float = 100.0) -> Callable[[SectionBuilder], SectionBuilder]:
    """Decorator adding a section; sections appear by ``order`` (core ones use 10-90)."""

    def decorate(build: SectionBuilder) -> SectionBuilder:
        if any(existing == name for _, existing, _ in _SECTIONS):
            raise ConfigError(f"report section {name!r} is already registered")
        _SECTIONS.append((order, name, build))
        _SECTIONS.sort(key=lambda entry: entry[0])
        return build

    return decorate


def _import_section_plugins() -> None:
    """Import the :data:`SECTION_MODULES`, which register their sections."""
    for name in SECTION_MODULES:
        importlib.import_module(name)


# --- formatting helpers ------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: ``-`` if missing, integers with separators."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "not reached"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def batch_size_axis(ax: Any, batch_sizes: list[int]) -> None:
    """Log2 x-axis with a labelled tick at every batch size of the sweep."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batch_sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{b:,}" for b in batch_sizes])
    ax.set_xlabel("batch size (log scale)")


def log_tick_label(value: float, _: int) -> str:
    """Plain tick labels on a log axis, only at 1, 2 and 5 times a power of ten."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
    return f"{value:g}" if mantissa in (1, 2, 5) else ""


def add_legend(ax: Any, **kwargs: Any) -> None:
    """A legend in the report's style, if the axes have labelled artists."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, framealpha=0.9, **kwargs)


# --- core sections -------------------------------------------------------------------


@register_section("overview", order=10)
def overview_section(ctx: ReportContext) -> Section:
    """What was run: task, grid, budget, and how many runs ended how."""
    configs = [row["config"] for row in ctx.rows]
    counts = {s: sum(row["status"] == s for row in ctx.rows) for s in STATUSES}
    budgets = sorted(
        {
            f"{c['epochs']:g} epochs" if c.get("epochs") else f"{c.get('steps')} steps"
            for c in configs
        }
    )
    plans = [ctx.run_config(row).get("plan", {}) for row in ctx.rows]
    targets = sorted(
        {
            f"{t['split']} {t['metric']} {'≤' if t['metric'] == 'loss' else '≥'} {t['value']:g}"
            for t in (p.get("target") for p in plans)
            if t
        }
    )
    seeds = sorted({c["seed"] for c in configs})
    lines = [
        f"**Task:** `{', '.join(sorted({c['task'] for c in configs}))}`. "
        f"**Budget:** {', '.join(budgets)} (fixed per run, so larger batches take fewer steps). "
        f"**Target:** {', '.join(targets) or 'none'}.",
        f"**Grid:** batch sizes {', '.join(f'{b:,}' for b in ctx.batch_sizes)}; "
        f"optimizers {', '.join(ctx.series)}; seeds {', '.join(map(str, seeds))}.",
        f"**Runs:** {len(ctx.rows)} recorded: {counts['done']} done, {counts['diverged']} diverged, "
        f"{counts['chance']} at chance level, {counts['failed']} failed. Where several learning "
        "rates were tried, each point uses the one with the best final validation accuracy "
        "(never the test split).",
    ]
    return Section("Overview", "\n\n".join(lines))


@register_section("accuracy", order=20)
def accuracy_section(ctx: ReportContext) -> Section:
    """Final test accuracy vs batch size, one line per series, band = seed range."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    lost = {}
    for series, pts in ctx.series.items():
        b = np.array([p.batch_size for p in pts])
        mean = np.array([p.mean("final_test_accuracy") for p in pts]) * 100
        low, high = (
            np.array([p.spread("final_test_accuracy")[i] for p in pts]) * 100 for i in (0, 1)
        )
        ax.plot(b, mean, "o-", color=ctx.colors[series], label=series)
        if any(len(p.values("final_test_accuracy")) > 1 for p in pts):
            ax.fill_between(b, low, high, color=ctx.colors[series], alpha=0.2, linewidth=0)
        lost[series] = [p.batch_size for p in pts if "done" not in p.statuses]
    bottom = ax.get_ylim()[0]
    for series, batch_sizes in lost.items():
        ax.plot(
            batch_sizes,
            [bottom] * len(batch_sizes),
            "x",
            color=ctx.colors[series],
            markersize=9,
            clip_on=False,
        )
    batch_size_axis(ax, ctx.batch_sizes)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Test accuracy vs batch size")
    ax.grid(True, alpha=0.3)
    add_legend(ax, loc="lower left")
    text = (
        "Mean over seeds (shaded: min-max over seeds when there are several); "
        "× on the bottom axis: every run at that point diverged, stayed at chance level "
        "(training loss no better than predicting the class frequencies) or failed."
    )
    return Section(
        "Test accuracy vs batch size",
        text,
        [Plot("accuracy", fig, "Final test accuracy vs batch size")],
    )


@register_section("generalization-gap", order=30)
def gap_section(ctx: ReportContext) -> Section:
    """Train minus test accuracy, and test minus train loss, vs batch size."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for series, pts in ctx.series.items():
        b = [p.batch_size for p in pts]
        acc_gap = [
            100 * (p.mean("final_train_accuracy") - p.mean("final_test_accuracy")) for p in pts
        ]
        loss_gap = [p.mean("final_test_loss") - p.mean("final_train_loss") for p in pts]
        acc_ax.plot(b, acc_gap, "o-", color=ctx.colors[series], label=series)
        loss_ax.plot(b, loss_gap, "o-", color=ctx.colors[series], label=series)
    for ax, ylabel, title in (
        (acc_ax, "train − test accuracy (points)", "Accuracy gap"),
        (loss_ax, "test − train loss", "Loss gap"),
    ):
        batch_size_axis(ax, ctx.batch_sizes)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    add_legend(acc_ax, loc="best")
    text = (
        "The generalization gap at the end of training, mean over seeds. A gap that grows "
        "with the batch is the large-batch generalization problem; a small gap with low "
        "accuracy instead means under-training (too few steps)."
    )
    return Section(
        "Generalization gap",
        text,
        [Plot("generalization_gap", fig, "Generalization gap vs batch size")],
    )


def steps_to_target_table(ctx: ReportContext) -> tuple[dict[str, dict[str, Any]], Table]:
    """Per series: measured steps-to-target, critical batch size and fitted model, and their table.

    The dict maps each series to ``{"b", "steps", "critical", "model"}``.
    """
    results, rows = {}, []
    for series, pts in ctx.series.items():
        b = [p.batch_size for p in pts]
        steps = [p.median_to_target("steps_to_target") for p in pts]
        critical = analysis.critical_batch_size(b, steps)
        model = analysis.fit_steps_model(b, steps)
        results[series] = {"b": b, "steps": steps, "critical": critical, "model": model}
        rows.append(
            [
                series,
                critical.describe(),
                f"≈ {model.b_crit:,.0f}" if model else "- (needs 3 points)",
                f"{model.s_min:,.0f}" if model else "-",
            ]
        )
    columns = [
        "optimizer",
        "critical batch size (2× perfect scaling)",
        "B_crit (McCandlish fit)",
        "S_min (fit)",
    ]
    return results, Table(columns, rows)


@register_section("steps-to-target", order=40)
def steps_section(ctx: ReportContext) -> Section | None:
    """Steps-to-target vs batch size, log-log, with perfect scaling and B_crit."""
    if not any(row.get("steps_to_target") is not None for row in ctx.rows):
        return Section(
            "Steps to target and the critical batch size",
            "No run reached its target, so steps-to-target and the critical batch size are "
            'undefined. Lower the target (`target = ["accuracy", 0.8]`) or raise the budget.',
        )
    results, table = steps_to_target_table(ctx)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    reached = [s for r in results.values() for s in r["steps"] if 0 < s < math.inf]
    ceiling = max(reached, default=1) * 2.5
    for i, (series, r) in enumerate(results.items()):
        color = ctx.colors[series]
        b, steps = np.array(r["b"], dtype=float), np.array(r["steps"])
        ok = np.isfinite(steps) & (steps > 0)
        ax.plot(b[ok], steps[ok], "o-", color=color, label=series)
        if np.isinf(steps).any():
            nudge = 2 ** (0.06 * (i - (len(results) - 1) / 2))  # side by side, not on top
            ax.plot(
                b[np.isinf(steps)] * nudge,
                np.full(np.isinf(steps).sum(), ceiling),
                "^",
                color=color,
                markerfacecolor="none",
                markersize=8,
            )
        critical = r["critical"]
        if critical.reference is not None:
            b0 = critical.reference
            s0 = steps[ok][0]
            line = np.array([b0, max(ctx.batch_sizes)], dtype=float)
            ax.plot(line, s0 * b0 / line, ":", color=color, linewidth=1.2)
        if critical.estimate is None and critical.high is not None:
            ax.axvspan(critical.low, critical.high, color=color, alpha=0.08, linewidth=0)
        if critical.estimate is not None:
            ax.axvline(critical.estimate, color=color, linestyle="--", linewidth=1, alpha=0.8)
            ax.annotate(
                f"{critical.estimate:,.0f}", (critical.estimate, 1), xycoords=("data", "axes fraction"),
                xytext=(3, -12 - 11 * i), textcoords="offset points", color=color, fontsize=9,
            )  # fmt: skip
    ax.plot([], [], ":", color="0.3", label="perfect scaling (∝ 1/B)")
    ax.plot([], [], "--", color="0.3", label="critical batch size")
    if any(not math.isfinite(s) for r in results.values() for s in r["steps"]):
        ax.plot([], [], "^", color="0.3", markerfacecolor="none", label="target not reached")
    ax.set_yscale("log")
    batch_size_axis(ax, ctx.batch_sizes)
    ax.set_ylabel("steps to target (log scale)")
    ax.set_title("Steps to target vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    add_legend(ax, loc="best")
    text = (
        "Steps to first reach the target (median over seeds; ▵ at the top: not reached within "
        "the budget). Dotted: perfect scaling from each optimizer's smallest batch size that "
        "reached the target (doubling the batch halves the steps). The **critical batch size** "
        "(dashed) is where the measured steps are twice that prediction, i.e. where the examples "
        "needed to reach the target have doubled; it is interpolated on log-log axes between "
        "neighbouring batch sizes. The McCandlish fit `S(B) = S_min (1 + B_crit / B)` gives a "
        "second estimate when at least three batch sizes reached the target. With a fixed epoch "
        "budget, large batches may stop before the target: the critical batch size is then only "
        "bracketed (shaded)."
    )
    return Section(
        "Steps to target and the critical batch size",
        text,
        [Plot("steps_to_target", fig, "Steps to target vs batch size")],
        [table],
    )


@register_section("loss-curves", order=50)
def curves_section(ctx: ReportContext) -> Section | None:
    """Train (solid) and test (dashed) loss over training, one panel per batch size."""
    panels = ctx.batch_sizes
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    drawn = False
    for ax, batch_size in zip(axes.flat, panels):
        initial = []
        for p in ctx.points:
            if p.batch_size != batch_size or not p.runs:
                continue
            curves = ctx.curves(p.runs[0])
            if "epoch" not in curves:
                continue
            for key, style in (("train_loss", "-"), ("test_loss", "--")):
                if key in curves:
                    ax.plot(
                        curves["epoch"],
                        curves[key],
                        style,
                        color=ctx.colors[p.series],
                        linewidth=1.3,
                    )
                    initial.append(curves[key][0])
                    drawn = True
        ax.set_title(f"batch size {batch_size:,}", fontsize=10)
        ax.set_yscale("log")
        if initial and np.isfinite(max(initial)):
            ax.set_ylim(top=3 * max(initial))  # a loss blowing up leaves the panel
        ax.yaxis.set_major_formatter(FuncFormatter(log_tick_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(log_tick_label))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    if not drawn:
        return None
    handles = [Line2D([], [], color=c, label=s) for s, c in ctx.colors.items()]
    handles += [
        Line2D([], [], color="0.3", linestyle="-", label="train loss"),
        Line2D([], [], color="0.3", linestyle="--", label="test loss"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9)
    text = (
        "Loss over training from each run's `metrics.csv` (first seed of the selected learning "
        "rate). The vertical axis stops at 3× the initial loss: a curve leaving the top has "
        "blown up."
    )
    return Section("Loss curves", text, [Plot("loss_curves", fig, "Loss curves per batch size")])


@register_section("results-table", order=60)
def table_section(ctx: ReportContext) -> Section:
    """One row per optimizer and batch size."""
    columns = [
        "optimizer", "batch", "base lr", "lr used", "seeds", "status", "test acc %", "± std",
        "train acc %", "val acc %", "test loss", "steps", "steps to target", "examples to target",
        "wall s",
    ]  # fmt: skip
    rows = []
    for series, pts in ctx.series.items():
        for p in pts:
            statuses = ", ".join(f"{p.statuses.count(s)} {s}" for s in STATUSES if s in p.statuses)
            plan = ctx.run_config(p.runs[0]).get("plan", {})
            lr = fmt(p.lr) if p.lr is not None else f"{fmt(plan.get('base_lr'))} (default)"
            if len(p.lrs) > 1:
                lr += f" (of {len(p.lrs)}, by {p.selected_by})"
            scaled = fmt(plan.get("lr"))
            rows.append(
                [
                    series,
                    f"{p.batch_size:,}",
                    lr,
                    scaled,
                    str(len(p.runs)),
                    statuses,
                    pct(p.mean("final_test_accuracy")),
                    pct(p.std("final_test_accuracy")),
                    pct(p.mean("final_train_accuracy")),
                    pct(p.mean("final_val_accuracy")),
                    fmt(p.mean("final_test_loss")),
                    fmt(p.mean("steps")),
                    fmt(p.median_to_target("steps_to_target")),
                    fmt(p.median_to_target("examples_to_target")),
                    f"{sum(r['wall_time'] or 0 for r in p.runs):.1f}",
                ]
            )
    return Section("Results by optimizer and batch size", "", tables=[Table(columns, rows)])


@register_section("problems", order=90)
def problems_section(ctx: ReportContext) -> Section | None:
    """Runs that diverged, stayed at chance level or failed, with their reason."""
    bad = [row for row in ctx.rows if row["status"] != "done"]
    if not bad:
        return None
    rows = [
        [
            row["cell_id"],
            row["status"],
            fmt(row["steps"]),
            (row["error"] or "")[:200],
            row.get("error_log") or "",
        ]
        for row in bad
    ]
    columns = ["run", "status", "steps", "reason", "traceback"]
    return Section("Diverged, chance-level and failed runs", tables=[Table(columns, rows)])


# --- rendering ------------------------------------------------------------------------


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as PNG bytes, at the resolution of every report figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def report(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (figures in ``figures/``) for a sweep.

    Returns the two paths. Raises ``ConfigError`` if the sweep has no recorded run.
    """
    sweep_dir = Path(sweep_dir)
    rows = ResultsStore(sweep_dir, create=False).rows()
    if not rows:
        raise ConfigError(f"No runs recorded in {sweep_dir}; run the sweep first")
    _import_section_plugins()
    ctx = ReportContext(sweep_dir, rows)
    sections = [section for _, _, build in _SECTIONS if (section := build(ctx)) is not None]
    return write_report(sweep_dir, f"Batch-size study: {sweep_dir.name}", sections)


def write_report(
    directory: str | Path, title: str, sections: list[Section], intro: str = ""
) -> tuple[Path, Path]:
    """Render ``sections`` as ``directory/report.html`` (self-contained) and ``report.md``.

    Figures are written to ``directory/figures/<stem>.png``; ``intro`` is a
    Markdown paragraph under the title. Every file is written atomically.
    """
    directory = Path(directory)
    html_parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    md_parts = [f"# {title}\n"]
    if intro:
        html_parts.append(f"<p>{_inline_html(intro)}</p>")
        md_parts.append(intro + "\n")
    figures_dir = directory / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        html_parts.append(f"<h2>{html.escape(section.title)}</h2>")
        md_parts.append(f"## {section.title}\n")
        for paragraph in filter(None, section.text.split("\n\n")):
            html_parts.append(f"<p>{_inline_html(paragraph)}</p>")
            md_parts.append(paragraph + "\n")
        for plot in section.plots:
            stem, caption = plot.stem, plot.caption
            png = png_bytes(plot.figure)
            write_bytes_atomic(figures_dir / f"{stem}.png", png)
            encoded = base64.b64encode(png).decode()
            html_parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
            md_parts.append(f"![{caption}]({FIGURES_DIR}/{stem}.png)\n")
        for table in section.tables:
            header = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in table.rows
            )
            html_parts.append(f"<table><tr>{header}</tr>{body}</table>")
            md_parts.append("| " + " | ".join(map(_md_cell, table.columns)) + " |")
            md_parts.append("|" + "---|" * len(table.columns))
            md_parts.extend("| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows)
            md_parts.append("")
    html_parts.append("</body></html>")
    html_path, md_path = directory / "report.html", directory / "report.md"
    write_text_atomic(html_path, "\n".join(html_parts))
    write_text_atomic(md_path, "\n".join(md_parts))
    return html_path, md_path


def summary(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: final test accuracy (%) per optimizer and batch size, and B_crit."""
    series = analysis.by_series(analysis.points(rows))
    batch_sizes = sorted({p.batch_size for pts in series.values() for p in pts})
    header = ["optimizer", *(f"{b:,}" for b in batch_sizes), "critical batch"]
    lines = []
    for name, pts in series.items():
        by_batch = {p.batch_size: p for p in pts}
        cells = []
        for b in batch_sizes:
            p = by_batch.get(b)
            if p is None:
                cells.append("")
            elif "done" in p.statuses:
                cells.append(pct(p.mean("final_test_accuracy")))
            else:
                cells.append(p.statuses[0])
        steps = [p.median_to_target() for p in pts]
        critical = analysis.critical_batch_size([p.batch_size for p in pts], steps)
        lines.append([name, *cells, critical.describe()])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        aligned = (
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        return "  ".join(aligned)

    title = "Final test accuracy (%) by optimizer and batch size"
    return "\n".join([title, render(header), *map(render, lines)])
