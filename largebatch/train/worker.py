"""One process of data-parallel training: ``python -m largebatch.train.worker CONFIG.json``.

Trains the config in ``CONFIG.json`` (a run directory's ``config.json``, or
``{"config": {...}}``; ``-`` reads it from standard input) as one rank of the
process group its environment describes. :func:`~largebatch.train.launch.launch`
starts these on one machine (``largebatch run --nproc N`` and sweeps); on
several machines, start it with torchrun on each::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 \\
        -m largebatch.train.worker config.json

Exit status: 0 done, 1 failed, diverged or at chance level (the reason is in
``result.json``), 2 rejected before training (one line on standard error), 130
interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from largebatch.utils.processes import die_with_parent

# first of all: a worker whose launcher is gone (or goes) must not train

if __name__ == "__main__" and "LARGEBATCH_LAUNCHER_PID" in os.environ:
    die_with_parent(int(os.environ["LARGEBATCH_LAUNCHER_PID"]))

EXIT_DONE, EXIT_FAILED, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Run the worker on ``argv`` (``[CONFIG.json]``); return its exit status."""
    from largebatch.train.config import RunConfig
    from largebatch.train.loop import train
    from largebatch.utils.errors import LargeBatchError

    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", 0))
    try:
        if len(argv) != 1:
            raise LargeBatchError("usage: python -m largebatch.train.worker CONFIG.json (or -)")
        source = "<stdin>" if argv[0] == "-" else argv[0]
        text = sys.stdin.read() if argv[0] == "-" else Path(argv[0]).read_text()
        result = train(RunConfig.from_json(text, source))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (LargeBatchError, ValueError, TypeError, KeyError, ImportError, OSError) as error:
        where = "" if rank == 0 else f" (rank {rank})"
        print(f"Error{where}: {error.args[0] if error.args else error}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_DONE if result.status == "done" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
