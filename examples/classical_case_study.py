"""The classical methods' case study (docs/classical.md): run every method, draw the figures.

    python examples/classical_case_study.py studies/classical [--quick] [--jobs N] [--figures DIR]

Each method is an ordinary sweep in DIRECTORY/<method> (``largebatch results`` reads
it); re-running continues where a killed run stopped. Writes ``classical_passes.png``
and ``classical_time.png`` into ``--figures`` (default DIRECTORY) and prints the
table of docs/classical.md. Runs use one torch thread each (the timings compare
methods, not thread counts).
"""

from __future__ import annotations

import argparse
import time

import torch

from largebatch.experiments.classical_study import run_study, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--quick", action="store_true", help="the small version the tests run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--figures", help="where the PNGs go (default: DIRECTORY)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    statuses = run_study(args.directory, quick=args.quick, jobs=args.jobs)
    for label, cells in statuses.items():
        print(f"{label}: {', '.join(sorted(set(cells.values())))}")
    print(write_study(args.directory, args.figures or args.directory, quick=args.quick))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
