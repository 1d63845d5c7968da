"""On-disk cache for generated data sets.

A generated data set is stored as ``<kind>-<hash>.npz`` in the cache directory
(``$LARGEBATCH_CACHE``, else ``~/.cache/largebatch``); the hash covers every
generation argument, so changing any of them gives a new file. Files are written
atomically (temporary file, fsync, rename): concurrent processes and crashes
never leave a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from largebatch.utils.atomic import atomic_write

CACHE_ENV = "LARGEBATCH_CACHE"
# Bump when the stored layout changes, so old files are not read back.
CACHE_FORMAT = 1

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path:
    """Where generated data sets are cached."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "largebatch")


def cache_path(kind: str, args: Mapping[str, Any]) -> Path:
    """The file for data set ``kind`` generated with ``args`` (JSON-serialisable)."""
    blob = json.dumps({"format": CACHE_FORMAT, "kind": kind, "args": dict(args)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-{digest}.npz"


def atomic_save_npz(path: Path, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` atomically (see :mod:`largebatch.utils.atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        np.savez(file, **arrays)


def _load(path: Path) -> Arrays | None:
    """The arrays in ``path``, or None if it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"Ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None


def cached(kind: str, args: Mapping[str, Any], generate: Callable[[], Arrays]) -> Arrays:
    """Arrays for ``kind``/``args`` from the cache, generating and storing them on a miss.

    If the cache directory cannot be written, the data are generated every time
    and a warning says so.
    """
    path = cache_path(kind, args)
    arrays = _load(path)
    if arrays is not None:
        return arrays
    arrays = generate()
    try:
        atomic_save_npz(path, arrays)
    except OSError as exc:
        warnings.warn(f"Could not cache {kind} data at {path}: {exc}", stacklevel=2)
    return arrays
