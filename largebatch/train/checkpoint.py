"""Atomic, verified checkpoints, and the random-number state they must carry.

A checkpoint file is ``torch.save`` bytes followed by a footer (a magic string
and the SHA-256 of those bytes), written atomically (:mod:`largebatch.utils.atomic`):
a crash leaves either the old file or the new one, never half of one. The
newest two are kept; loading checks the footer and falls back to the older
file, with a clear message, when the newest is truncated or corrupt. When no
checkpoint is usable, loading fails and leaves every file where it is.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largebatch.utils.atomic import write_bytes_atomic
from largebatch.utils.errors import CheckpointError

MAGIC = b"LBCKPT01"
FOOTER_SIZE = len(MAGIC) + hashlib.sha256().digest_size
KEEP = 2


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    return sorted(directory.glob("step-*.pt"))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep it and the previous one."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = checkpoint_path(directory, step)
    write_bytes_atomic(path, payload + MAGIC + hashlib.sha256(payload).digest())
    for old in list_checkpoints(directory)[:-KEEP]:
        old.unlink()
    return path


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read and verify one checkpoint; ``CheckpointError`` says what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {error}") from None
    payload, footer = data[:-FOOTER_SIZE], data[-FOOTER_SIZE:]
    if len(data) < FOOTER_SIZE or not footer.startswith(MAGIC):
        raise CheckpointError(f"Checkpoint {path} is truncated or not a largebatch checkpoint")
    if hashlib.sha256(payload).digest() != footer[len(MAGIC) :]:
        raise CheckpointError(f"Checkpoint {path} is corrupt (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def load_latest(
    directory: Path, map_location: torch.device | str = "cpu", rename_corrupt: bool = True
) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint in ``directory`` and its path; ``None`` if there is none.

    An unusable newer file is skipped with a warning and the previous one is
    tried; once a usable one is found, the unusable newer ones are, if
    ``rename_corrupt`` (one process only), renamed ``*.corrupt`` (kept for
    inspection, out of the way of later saves). Raises ``CheckpointError`` if
    checkpoints exist (or only ``*.corrupt`` ones set aside earlier) but none is
    usable; then nothing is renamed, so a later attempt fails the same way rather
    than starting over from step 0.
    """
    candidates = list_checkpoints(directory)[::-1]
    unusable = []
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as error:
            unusable.append(path)
            more = "; falling back to the previous checkpoint" if i + 1 < len(candidates) else ""
            warnings.warn(f"{error}{more}", stacklevel=2)
            continue
        if rename_corrupt:
            for bad in unusable:
                bad.rename(bad.with_name(bad.name + ".corrupt"))
        return state, path
    set_aside = sorted(directory.glob("step-*.pt.corrupt"))
    if unusable or set_aside:
        names = [p.name for p in [*unusable, *set_aside]]
        verb = "is" if len(names) == 1 else "are"
        raise CheckpointError(
            f"No usable checkpoint in {directory}: {', '.join(names)} {verb} truncated or "
            "corrupt, and left there. To start this run over, delete its directory (or "
            "choose another)"
        )
    return None


def rng_state() -> dict[str, Any]:
    """The state of every random-number generator a run draws from."""
    # the legacy global generator is the one user code and data pipelines draw from
    kind, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
