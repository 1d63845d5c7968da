"""The files of one run directory.

``config.json`` (the config, the resolved plan, versions, git hash),
``metrics.csv`` (one row per evaluation), ``result.json`` (the
:class:`RunResult`), ``checkpoints/`` and, when ``tensorboard`` is installed,
TensorBoard event files. Only rank 0 writes; on other ranks every method is a
no-op. On resume, rows logged after the checkpoint are dropped, so no step is
ever logged twice.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from largebatch.train.config import RESUMABLE_CHANGES, RunConfig, RunResult
from largebatch.utils.atomic import write_json_atomic, write_text_atomic


def _git_hash() -> str | None:
    """The commit of the largebatch source tree, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    import largebatch

    return {
        "largebatch": largebatch.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _tensorboard_writer(path: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` if ``tensorboard`` is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def scalar_items(row: dict[str, Any]) -> list[tuple[str, float]]:
    """The entries of a metrics row that are numbers, ``step`` aside.

    A row leaves a column empty (``""``) where nothing was measured at that step,
    e.g. the noise scale between measurements: TensorBoard gets no point there.
    """
    return [
        (key, float(value))
        for key, value in row.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    ]


class RunDirectory:
    """Writes a run's files under ``path`` (only if ``enabled``, i.e. on rank 0)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.checkpoints = self.path / "checkpoints"
        self._metrics_file = None
        self._writer: csv.DictWriter | None = None
        self._tensorboard = None

    def write_config(self, config: RunConfig, plan: Any) -> None:
        """Write ``config.json``; on resume, first check the config matches the saved one.

        Raises ``ValueError`` naming the fields that differ, as resuming with other
        settings would not continue the same run.
        """
        file = self.path / "config.json"
        if config.resume and file.exists():
            saved = RunConfig.from_dict(json.loads(file.read_text())["config"])
            changed = [
                f.name
                for f in dataclasses.fields(RunConfig)
                if f.name not in RESUMABLE_CHANGES
                and getattr(saved, f.name) != getattr(config, f.name)
            ]
            if changed:
                raise ValueError(
                    f"Cannot resume {self.path}: the config differs in {', '.join(changed)}"
                )
        if not self.enabled:
            return
        content = {
            "config": config.to_dict(),
            "plan": dataclasses.asdict(plan),
            "versions": _versions(),
            "git": _git_hash(),
        }
        write_json_atomic(file, content)

    def open_metrics(self, columns: list[str], resume_step: int | None) -> None:
        """Start ``metrics.csv``; when resuming, keep only rows up to ``resume_step``."""
        if not self.enabled:
            return
        file = self.path / "metrics.csv"
        kept: list[dict[str, str]] = []
        if resume_step is not None and file.exists():
            with open(file, newline="") as old:
                # a row cut short by a kill has missing (None) fields: drop it
                kept = [
                    row
                    for row in csv.DictReader(old)
                    if None not in row.values() and int(row["step"]) <= resume_step
                ]
        content = io.StringIO()
        writer = csv.DictWriter(content, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(file, content.getvalue())
        self._metrics_file = open(file, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._metrics_file, columns, extrasaction="ignore")
        purge = None if resume_step is None else resume_step + 1
        self._tensorboard = _tensorboard_writer(self.path / "tensorboard", purge)

    def log(self, row: dict[str, float]) -> None:
        """Append one row of metrics (and the same scalars to TensorBoard)."""
        if not self.enabled:
            return
        self._writer.writerow(row)
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in scalar_items(row):
                self._tensorboard.add_scalar(key, value, row["step"])

    def write_error(self, text: str, rank: int = 0) -> Path:
        """Write a failure's full traceback (``error.log``, or ``error.rank{N}.log``).

        Every rank writes its own, since a failure may happen on one rank only.
        Returns the file's path.
        """
        name = "error.log" if rank == 0 else f"error.rank{rank}.log"
        path = self.path / name
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return path

    def write_result(self, result: RunResult) -> None:
        """Write ``result.json`` atomically."""
        if self.enabled:
            write_json_atomic(self.path / "result.json", result.to_dict())

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
