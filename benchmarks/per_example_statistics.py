"""Cost of the adaptive sampling tests' per-example statistics against a plain step [target < 2x].

On mnist1d-cnn at one batch size (default 1,024), per optimizer step (SGD with
momentum, the same batch every time):

* ``plain``: zero_grad, forward, backward, step (the baseline);
* ``norm test, group m``: :func:`gradient_statistics` without projections gives
  the statistics *and* the mean gradient in one pass, which replaces the
  backward pass; ``m`` examples per sample (1 = exact per-example);
* ``inner-product test, group m``: with ``--method auto`` (hooks serve this
  model) the same pass with the projections ``S3``, computed after it from the
  saved layer inputs and output gradients (what the step driver does); with
  ``--method vmap`` the plain backward, then :func:`gradient_statistics` with the
  step's gradient (the projections need the mean first);
* ``norm test, group 1, every k``: the exact norm test on one step in ``k``
  (``NormTest(every=k)``), plain steps in between; time per step.

``--method`` picks the per-example machinery: ``auto`` (the default: module
hooks on an ordinary forward and backward pass) or ``vmap`` (``torch.func``, the
default before 2026-12-05).

Times are CPU seconds of this process (``time.process_time``; with one thread
that is the compute time, much less disturbed than wall time by other
processes on a shared machine). Rounds interleave the variants, so drift hits
all of them alike; the figure is the median over rounds of each variant's time
divided by the plain step's time in the same round.

Run: ``python benchmarks/per_example_statistics.py [--threads 1] [--batch-size 1024] [--rounds 15] [--every 4] [--method auto]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from largebatch.diagnostics import fixed_subset
from largebatch.diagnostics.per_example import gradient_statistics
from largebatch.tasks import get_task


def variants(
    task, model, inputs, targets, groups: list[int], chunk_size: int, every: int, method: str
):
    """``name -> one optimizer step`` for every variant."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = list(model.parameters())

    def plain() -> None:
        optimizer.zero_grad()
        task.loss_fn(model(inputs), targets).backward()
        optimizer.step()

    def statistics_step(group: int, projections: bool) -> Callable[[], None]:
        def step() -> None:
            _, mean = gradient_statistics(
                model,
                task.loss_fn,
                inputs,
                targets,
                group_size=group,
                chunk_size=chunk_size,
                projections=projections,
                method=method,
            )
            for p, g in zip(params, mean):
                p.grad = g
            optimizer.step()

        return step

    def inner_product_test(group: int) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad()
            task.loss_fn(model(inputs), targets).backward()
            gradient_statistics(
                model,
                task.loss_fn,
                inputs,
                targets,
                mean_gradient=[p.grad for p in params],
                group_size=group,
                chunk_size=chunk_size,
                method=method,
            )
            optimizer.step()

        return step

    def tested_every(step: Callable[[], None]) -> Callable[[], None]:
        calls = iter(range(10**9))

        def cycle() -> None:
            (step if next(calls) % every == 0 else plain)()

        return cycle

    steps = {"plain": plain}
    for group in groups:
        steps[f"norm test, group {group}"] = statistics_step(group, False)
    for group in groups:
        steps[f"inner-product test, group {group}"] = (
            inner_product_test(group) if method == "vmap" else statistics_step(group, True)
        )
    steps[f"norm test, group 1, every {every}"] = tested_every(statistics_step(1, False))
    return steps


def seconds(step: Callable[[], None], repeats: int) -> float:
    """CPU seconds per call of ``step``."""
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--method", choices=["auto", "vmap"], default="auto")
    args = parser.parse_args()
    if args.repeats % args.every:
        parser.error(f"--repeats {args.repeats} must be a multiple of --every {args.every}")
    torch.set_num_threads(args.threads)

    task = get_task("mnist1d-cnn")
    inputs, targets = fixed_subset(task.train, args.batch_size, batch_size=args.batch_size)[0]
    torch.manual_seed(0)
    model = task.build_model()
    steps = variants(
        task, model, inputs, targets, args.groups, args.chunk_size, args.every, args.method
    )
    for step in steps.values():  # warm-up: vmap tracing, allocator
        step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(seconds(step, args.repeats))
        for name in steps:
            ratios[name].append(times[name][-1] / times["plain"][-1])

    print(
        f"mnist1d-cnn ({sum(p.numel() for p in model.parameters())} parameters), batch "
        f"{args.batch_size}, chunk {args.chunk_size}, {args.threads} thread(s), {args.method}, "
        f"{args.rounds} interleaved rounds of {args.repeats} steps"
    )
    print(
        f"{'variant':36s} {'median CPU ms':>14s} {'x plain (median)':>17s} {'x plain (min)':>14s}"
    )
    for name in steps:
        print(
            f"{name:36s} {1e3 * statistics.median(times[name]):14.1f} "
            f"{statistics.median(ratios[name]):17.2f} {min(ratios[name]):14.2f}"
        )


if __name__ == "__main__":
    main()
