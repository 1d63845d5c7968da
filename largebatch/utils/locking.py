"""An exclusive lock on a directory, held by every process that writes there.

The lock is ``flock`` on a ``.lock`` file inside the directory. The operating
system releases it when the last process holding it exits, however it exits
(``kill -9`` included), so a lock never outlives its writers and never needs
cleaning up. Three ways to hold it:

* :func:`locked` or :meth:`DirectoryLock.acquire` -- fail at once (``wait=False``, what a second
  ``largebatch run`` on the same directory should do) or wait for it.
* again in the same thread (a sweep holds a cell's lock and calls ``train``,
  which takes it too): acquisitions nest and only the outermost releases.
* handed down: a launcher passes its lock to the worker processes it starts
  (:meth:`DirectoryLock.child_env` and ``pass_fds``), so the directory stays
  locked for as long as any of them lives, the launcher included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from largebatch.utils.errors import RunDirectoryError

LOCK_FILE = ".lock"
#: the environment variable through which a child learns the descriptor of an inherited lock
INHERITED_ENV = "LARGEBATCH_INHERITED_LOCK"


@dataclass
class _Held:
    fd: int
    thread: int
    depth: int


_held: dict[str, _Held] = {}
_guard = threading.Lock()


@contextlib.contextmanager
def locked(directory: str | Path, wait: bool = False) -> Iterator[DirectoryLock]:
    """Hold the lock of ``directory`` for the enclosed block (see :meth:`DirectoryLock.acquire`)."""
    lock = DirectoryLock(directory)
    lock.acquire(wait)
    try:
        yield lock
    finally:
        lock.release()


class DirectoryLock:
    """The lock of ``directory`` (its ``.lock`` file)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE

    @property
    def _key(self) -> str:
        return str(self.path.absolute())

    @property
    def fd(self) -> int:
        """The descriptor holding the lock (``KeyError`` unless this process holds it)."""
        return _held[self._key].fd

    def acquire(self, wait: bool = False) -> None:
        """Take the lock, creating the directory if needed.

        Raises :class:`~largebatch.utils.errors.RunDirectoryError` naming the
        directory and the holder's process id if another process (or thread) holds
        it and ``wait`` is false; ``OSError`` if the directory cannot be created.
        """
        with _guard:
            held = _held.get(self._key)
            if held is not None and held.thread == threading.get_ident():
                held.depth += 1
                return
        fd = self._inherited()
        if fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(
                f"{self.directory} is in use by another process ({self.holder()}); "
                "wait for it to finish or choose another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _guard:
            _held[self._key] = _Held(fd, threading.get_ident(), 1)

    def release(self) -> None:
        """Undo one :meth:`acquire`; the outermost one unlocks."""
        with _guard:
            held = _held[self._key]
            held.depth -= 1
            if held.depth:
                return
            del _held[self._key]
        os.close(held.fd)  # closing the last descriptor of the open file releases the flock

    def holder(self) -> str:
        """``pid N`` of the process that last took the lock, as far as its file says."""
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "unknown process"

    def child_env(self) -> dict[str, str]:
        """Environment that lets a child process started with ``pass_fds=(lock.fd,)`` adopt it."""
        return {INHERITED_ENV: str(self.fd)}

    def _inherited(self) -> int | None:
        """A descriptor of this lock file handed down by the parent process, if any."""
        text = os.environ.get(INHERITED_ENV, "")
        if not text.isdigit():
            return None
        try:
            inherited, ours = os.fstat(int(text)), os.stat(self.path)
        except OSError:
            return None
        if (inherited.st_dev, inherited.st_ino) != (ours.st_dev, ours.st_ino):
            return None
        return os.dup(int(text))
