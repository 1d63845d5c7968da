"""Child processes that end with their parent, however the parent ends.

A worker left running after its launcher was killed keeps writing into a run
directory that a new launcher may be writing too. :func:`die_with_parent`
prevents that twice over: on Linux the kernel sends the child ``SIGKILL`` when
its parent exits (``prctl(PR_SET_PDEATHSIG)``); everywhere, a watchdog thread
notices that the parent is gone (the child is re-parented) and does the same.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

#: the Linux ``prctl`` option that asks for a signal when the parent exits
PR_SET_PDEATHSIG = 1
#: the environment variable with the process id a launched worker must die with
LAUNCHER_PID_ENV = "LARGEBATCH_LAUNCHER_PID"


def die_with_parent(parent_pid: int | None = None, poll_seconds: float = 0.5) -> None:
    """Make this process end (``SIGKILL``) as soon as its parent does.

    ``parent_pid`` is the process that should be the parent (default: the
    current one); if it is already gone, this process ends at once, which closes
    the window between its start and this call.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    watchdog = threading.Thread(
        target=_watch, args=(parent, poll_seconds), name="parent-watchdog", daemon=True
    )
    watchdog.start()


def _watch(parent: int, poll_seconds: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), signal.SIGKILL)
