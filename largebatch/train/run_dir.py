"""The files of one run directory, and who may write them.

``config.json`` (the config, the resolved plan, versions, git hash),
``metrics.csv`` (one row per evaluation), ``batch_sizes.csv`` (one row per
step, for a run whose batch grows), ``result.json`` (the
:class:`RunResult`), ``checkpoints/``, ``error.log`` after a failure and, when
``tensorboard`` is installed, TensorBoard event files. Only rank 0 writes; on
other ranks every method is a no-op. On resume, rows logged after the
checkpoint are dropped, so no step is ever logged twice.

A run first :meth:`~RunDirectory.claim` s its directory: it takes the
directory's lock (:mod:`largebatch.utils.locking`; a second writer fails at
once, naming the holder) and checks that the directory may be written as the
config asks. Every check of the file system is here; the config checks itself.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from largebatch.train.checkpoint import load_latest
from largebatch.train.config import RESUMABLE_CHANGES, RunConfig, RunResult
from largebatch.utils.atomic import write_json_atomic, write_text_atomic
from largebatch.utils.errors import ConfigError
from largebatch.utils.locking import DirectoryLock

# files whose presence means a run directory already holds a run
RUN_FILES = ("metrics.csv", "result.json", "checkpoints")


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


def read_result(path: str | Path, since: float | None = None) -> RunResult | None:
    """The ``result.json`` of run directory ``path`` (written atomically at a run's end).

    ``None`` if there is none, or if it is older than ``since`` (a ``time.time()``):
    the result of an earlier attempt at the run.
    """
    file = Path(path) / "result.json"
    try:
        if since is not None and file.stat().st_mtime < since:
            return None
        return RunResult(**json.loads(file.read_text()))
    except FileNotFoundError:
        return None


class RunDirectory:
    """Writes a run's files under ``path`` (only if ``enabled``, i.e. on rank 0)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.checkpoints = self.path / "checkpoints"
        self.lock = DirectoryLock(self.path)
        self._claimed = False
        self._metrics: _CsvLog | None = None
        self._steps: _CsvLog | None = None
        self._tensorboard = None

    def claim(self, config: RunConfig) -> None:
        """Lock the directory (creating it) and check ``config`` may write there.

        Raises :class:`~largebatch.utils.errors.RunDirectoryError` if another
        process holds the lock, and ``ConfigError`` if the directory is not
        writable, already holds a run (without ``resume``), or holds a run whose
        config differs (with ``resume``). Nothing is written unless it succeeds.
        Undo with :meth:`release`.
        """
        try:
            self.lock.acquire()
        except OSError as error:
            raise ConfigError(
                f"Output directory {str(self.path)!r} is not writable: {error}"
            ) from None
        try:
            self._check_usable(config)
        except BaseException:
            self.lock.release()
            raise
        self._claimed = True

    def release(self) -> None:
        """Give up what :meth:`claim` took."""
        if self._claimed:
            self._claimed = False
            self.lock.release()

    def _check_usable(self, config: RunConfig) -> None:
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            raise ConfigError(
                f"Output directory {str(self.path)!r} is not writable: {error}"
            ) from None
        if not config.resume:
            used = [name for name in RUN_FILES if (self.path / name).exists()]
            if used:
                raise ConfigError(
                    f"Output directory {str(self.path)!r} already holds a run "
                    f"({', '.join(used)}); resume it or choose another directory"
                )
            return
        file = self.path / "config.json"
        if file.exists():
            saved = RunConfig.from_dict(json.loads(file.read_text())["config"])
            changed = [
                f.name
                for f in dataclasses.fields(RunConfig)
                if f.name not in RESUMABLE_CHANGES
                and getattr(saved, f.name) != getattr(config, f.name)
            ]
            if changed:
                raise ConfigError(
                    f"Cannot resume {self.path}: the config differs in {', '.join(changed)}"
                )

    def latest_checkpoint(self) -> tuple[dict[str, Any], Path] | None:
        """The newest usable checkpoint and its path (see :func:`~.checkpoint.load_latest`)."""
        return load_latest(self.checkpoints, rename_corrupt=self.enabled)

    def write_config(self, config: RunConfig, plan: Any) -> None:
        """Write ``config.json``: the config, the resolved plan, versions and git hash."""
        if not self.enabled:
            return
        file = self.path / "config.json"
        content = {
            "config": config.to_dict(),
            "plan": dataclasses.asdict(plan),
            "versions": _versions(),
            "git": _git_hash(),
        }
        write_json_atomic(file, content)

    def open_metrics(
        self, columns: list[str], resume_step: int | None, step_columns: list[str] | None = None
    ) -> None:
        """Start ``metrics.csv`` and, given ``step_columns``, ``batch_sizes.csv``; when
        resuming, keep only rows up to ``resume_step``."""
        if not self.enabled:
            return
        self._metrics = _CsvLog(self.path / "metrics.csv", columns, resume_step)
        if step_columns:
            self._steps = _CsvLog(self.path / "batch_sizes.csv", step_columns, resume_step)
        purge = None if resume_step is None else resume_step + 1
        self._tensorboard = _tensorboard_writer(self.path / "tensorboard", purge)

    def log(self, row: dict[str, float], steps: list[dict[str, Any]] = ()) -> None:
        """Append one row of metrics (and the same scalars to TensorBoard), and the
        per-step rows since the last one to ``batch_sizes.csv``."""
        if not self.enabled:
            return
        self._metrics.write([row])
        if self._steps is not None:
            self._steps.write(steps)
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
        for log in (self._metrics, self._steps):
            if log is not None:
                log.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class _CsvLog:
    """An appended CSV file whose rows carry a ``step``; reopened on resume with only
    the rows up to ``resume_step`` (a row cut short by a kill is dropped), rewritten
    atomically, so that no step is ever logged twice."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as old:
                kept = [
                    row
                    for row in csv.DictReader(old)
                    if None not in row.values() and int(row["step"]) <= resume_step
                ]
        content = io.StringIO()
        writer = csv.DictWriter(content, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(path, content.getvalue())
        self._file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._file, columns, extrasaction="ignore")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
