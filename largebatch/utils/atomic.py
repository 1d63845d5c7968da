"""Atomic file writes: readers see the old file or the new one, never half of one.

The content goes to a uniquely named temporary file in the target's directory,
which is flushed and fsync'ed, renamed over the target (atomic on POSIX), and
the directory is fsync'ed so that the rename survives a crash. A failure at any
point leaves the old file untouched and removes the temporary one. Concurrent
writers never share a temporary file; the last rename wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates files readable by their owner only; use what open() gives
# under the usual umask (022), so shared caches and run directories stay readable.
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file to write ``path``'s new content; it replaces ``path`` on success.

    ``mode`` is ``"wb"`` or ``"w"``; ``open_kwargs`` go to :func:`open` (e.g.
    ``newline=""`` for CSV). The parent directory must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"Invalid mode: {mode!r} (expected 'w' or 'wb')")
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as file:
            os.fchmod(file.fileno(), FILE_MODE)
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically."""
    with atomic_write(path, "wb") as file:
        file.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    with atomic_write(path, "w", encoding="utf-8") as file:
        file.write(text)


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Replace ``path`` by ``value`` as JSON atomically."""
    write_text_atomic(path, json.dumps(value, indent=indent) + "\n")
