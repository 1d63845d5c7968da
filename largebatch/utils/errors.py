"""The errors largebatch raises about what a user gave it, and their one style.

Every message is one sentence that names the offending value and says what was
expected (``Invalid batch_size: 0 (must be a positive integer)``), so the
command line can print it as a single line without a traceback. The types are
few; each also derives from the built-in exception Python code would expect
(``ValueError`` for a bad value, ``KeyError`` for an unknown name), so callers
may catch either.

* :class:`ConfigError` -- a setting is invalid: wrong type, out of range, an
  unknown key, an inconsistent combination, an output directory that cannot be
  used as asked (already holds another run, config differs on resume).
* :class:`UnknownNameError` -- a name that is not registered (task, optimizer,
  results column); the message lists the valid names and suggests the closest.
* :class:`TaskError` -- a task could not be built because its builder raised.
* :class:`RunDirectoryError` -- a run directory is in use by another process.
* :class:`CheckpointError` -- a checkpoint cannot be used (truncated, corrupt).

Two more live with what they are about: ``SweepConfigError`` and ``StudyError``
(both ``ConfigError``) and ``ResultsStoreError``. The optimizers and the
diagnostics' measurement functions keep torch's convention instead
(``ValueError`` / ``TypeError`` naming the argument), as ``torch.optim`` users
expect (docs/architecture.md, Errors).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LargeBatchError(Exception):
    """Base of the errors above; ``str(error)`` is the complete one-line message."""


class ConfigError(LargeBatchError, ValueError):
    """An invalid setting; the message names the setting, the value and what is expected."""


class UnknownNameError(LargeBatchError, KeyError):
    """A name not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskError(LargeBatchError, RuntimeError):
    """A task's builder raised; the original exception is the ``__cause__``."""


class RunDirectoryError(LargeBatchError, RuntimeError):
    """A run directory cannot be written now (another process holds its lock)."""


class CheckpointError(LargeBatchError, RuntimeError):
    """A checkpoint cannot be used (truncated, corrupt, or not a checkpoint)."""


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    """'Unknown X' message listing the valid names and suggesting the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid)}."
