"""A training step with a batch-size test's statistics against a plain step, through the loop's
step driver [target < 2x].

``largebatch.train.step.StepDriver`` on mnist1d-cnn (SGD with momentum, batches of
1,024 read from the training set as the loop reads them), per step:

* ``plain``: the loop's standard step (forward, backward, step);
* ``norm test``: the statistics pass (an ordinary forward and backward with module
  hooks, since 2026-12-05; ``vmap(grad)`` before) gives the mean gradient too,
  which replaces the backward pass (the driver's cheap path); ``group m``: ``m``
  examples per sample;
* ``norm test every k``: the exact test on one step in ``k`` (``every=k``);
* ``inner-product test``: the same pass, with the projections computed after it
  (with ``vmap``: the backward, then the statistics with the step's gradient).

What ``benchmarks/per_example_statistics.py`` measures for the bare statistics,
here with everything the loop adds (the data stream, the driver). CPU seconds of
this process (``time.process_time``) over ``--steps`` steps per variant and
round; rounds interleave the variants; the figure is the median over rounds of
each variant's time divided by the plain step's in the same round.

Run: ``python benchmarks/batch_growth_step.py [--threads 1] [--batch-size 1024] [--rounds 5] [--steps 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DistributedSampler

from largebatch.optim import create_optimizer
from largebatch.tasks import get_task
from largebatch.train.data import BatchStream
from largebatch.train.step import StatisticsRequest, StepDriver

#: name -> (statistics request, on every k-th step)
VARIANTS: dict[str, tuple[StatisticsRequest | None, int]] = {
    "plain": (None, 1),
    "norm test, exact": (StatisticsRequest(chunk_size=1024), 1),
    "norm test, group 4": (StatisticsRequest(group_size=4, chunk_size=1024), 1),
    "norm test, exact, every 4": (StatisticsRequest(chunk_size=1024), 4),
    "inner-product test, exact": (StatisticsRequest(projections=True, chunk_size=1024), 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("mnist1d-cnn")
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = create_optimizer("sgd", model, lr=1e-3)
    sampler = DistributedSampler(task.train, 1, 0, shuffle=True, seed=0, drop_last=True)
    stream = BatchStream(task.train, sampler, args.batch_size, 1, torch.device("cpu"))
    driver = StepDriver(model, optimizer, task.loss_fn)

    def run(request: StatisticsRequest | None, every: int) -> float:
        start = time.process_time()
        for step in range(args.steps):
            driver.step(stream, statistics=request if step % every == 0 else None)
        return (time.process_time() - start) / args.steps

    for request, every in VARIANTS.values():  # warm up
        run(request, every)
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    plain_times = []
    for _ in range(args.rounds):
        times = {name: run(*variant) for name, variant in VARIANTS.items()}
        plain_times.append(times["plain"])
        for name, value in times.items():
            ratios[name].append(value / times["plain"])
    print(
        f"mnist1d-cnn, batch {args.batch_size}, {args.threads} thread(s), "
        f"plain step {1e3 * statistics.median(plain_times):.1f} ms (median of {args.rounds} rounds)"
    )
    for name, values in ratios.items():
        print(
            f"  {name:<28} x{statistics.median(values):.2f}  (rounds {min(values):.2f}-{max(values):.2f})"
        )


if __name__ == "__main__":
    main()
