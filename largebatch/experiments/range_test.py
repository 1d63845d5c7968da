"""The learning-rate range test's directory: ``lr_find.json`` and the figure ``lr_find.png``.

The test itself is :func:`largebatch.train.lr_finder.range_test`; this module
draws its curve and writes both files atomically into a directory of their own,
under that directory's lock.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from largebatch.experiments.report import png_bytes
from largebatch.train.lr_finder import RangeTestResult
from largebatch.utils.atomic import write_bytes_atomic, write_json_atomic
from largebatch.utils.errors import ConfigError
from largebatch.utils.locking import locked

JSON_FILE = "lr_find.json"
FIGURE_FILE = "lr_find.png"


def range_test_figure(result: RangeTestResult, title: str | None = None) -> Figure:
    """Loss against learning rate (log axis): raw and smoothed, the suggestions marked."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    lrs = np.array(result.lrs)
    ax.plot(lrs, result.losses, color="0.7", linewidth=0.8, label="loss per step")
    ax.plot(lrs, result.smoothed, color="C0", linewidth=1.8, label="smoothed")
    marks: list[tuple[float | None, str, str]] = [
        (result.steepest_lr, "C2", "steepest descent"),
        (result.suggested_lr, "C1", "minimum / 10"),
        (result.blow_up_lr, "C3", "blow-up"),
    ]
    for rate, color, label in marks:
        if rate is not None:
            ax.axvline(
                rate, color=color, linestyle="--", linewidth=1.2, label=f"{label}: {rate:.3g}"
            )
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # the blown-up tail would squash the rest of the curve
        low, high = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * (high - low + 1e-12), max(high, low) * 1.5 + 1e-12)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, framealpha=0.9, loc="best")
    ax.set_title(title or "Learning-rate range test")
    return fig


def check_directory(directory: str | Path) -> None:
    """``ConfigError`` if ``directory`` already holds a range test (a pure check)."""
    if (Path(directory) / JSON_FILE).exists():
        raise ConfigError(
            f"Output directory {str(directory)!r} already holds a range test; "
            "choose another directory"
        )


def write_range_test(result: RangeTestResult, directory: str | Path) -> tuple[Path, Path]:
    """Write ``lr_find.json`` and ``lr_find.png`` into ``directory``; their paths.

    Holds the directory's lock while writing; ``ConfigError`` if it already holds
    a range test, ``RunDirectoryError`` if another process holds it.
    """
    directory = Path(directory)
    json_path, figure_path = directory / JSON_FILE, directory / FIGURE_FILE
    check_directory(directory)
    config: dict[str, Any] = result.config
    title = (
        f"Range test: {config.get('task')}, {config.get('optimizer')}, "
        f"batch {config.get('batch_size')}"
    )
    with locked(directory):
        check_directory(directory)  # again: another process may have written meanwhile
        write_bytes_atomic(figure_path, png_bytes(range_test_figure(result, title)))
        write_json_atomic(json_path, result.to_dict())
    return json_path, figure_path
