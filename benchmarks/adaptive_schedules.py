"""Cost of the adaptive schedules, against the fixed schedule measured in the same run.

1. AutoWU's once-per-epoch test (Gaussian-process fit and five posteriors) by
   the number of losses kept so far, CPU time of one test, against the CPU time
   of one epoch of ``train`` on mnist1d-cnn at ``--batch-size`` (fixed cosine
   schedule). Reported: the test's share of an epoch.
2. Per-step CPU time of ``train`` with ``accumulation_steps=2``: fixed cosine
   schedule without noise-scale logging (the baseline), the same with the noise
   scale logged every 10th step (the default), AdaScale (statistics every step,
   one host sync per step for the gain), and AutoWU (losses kept as tensors,
   one sync and one test per epoch). Each from the difference of a ``--steps``
   and a ``3 x --steps`` run (set-up and evaluation cancel), repeats interleaved.

Times are this process's CPU time with one thread (a shared machine disturbs
that far less than wall time). Run:
``python benchmarks/adaptive_schedules.py [--batch-size 256] [--steps 150] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from largebatch.tasks import get_task
from largebatch.train import RunConfig, train
from largebatch.train.autowu import AutoWUSchedule, minimum_test

TASK = "mnist1d-cnn"
VARIANTS = {
    "cosine, no noise scale (baseline)": dict(noise_scale=False),
    "cosine, noise scale every 10th step": dict(noise_scale_every=10),
    "adascale": dict(scaling="adascale", base_batch_size=64),
    "autowu": dict(lr=None, warmup_steps=None, schedule="autowu", autowu_max_lr=0.5),
}


def run_seconds(steps: int, batch_size: int, settings: dict) -> tuple[float, int]:
    """CPU time of ``train`` with a ``steps`` budget and accumulation 2, and the steps it took
    (AdaScale takes more: evaluations at the ends only)."""
    with tempfile.TemporaryDirectory() as out:
        fields = dict(
            task=TASK, optimizer="sgd", optimizer_options={"momentum": 0.9}, lr=0.1,
            base_batch_size=batch_size, batch_size=batch_size, accumulation_steps=2,
            warmup_steps=0, steps=steps, eval_every=steps, out_dir=out,
        )  # fmt: skip
        config = RunConfig(**{**fields, **settings})
        start = time.process_time()
        result = train(config)
        return time.process_time() - start, result.steps


def gp_test_seconds(count: int, repeats: int) -> float:
    """Median CPU time of one AutoWU test on ``count`` losses of a noisy U-shaped curve."""
    rng = np.random.default_rng(0)
    losses = 1 + np.linspace(-1, 0.3, count) ** 2 + 0.05 * rng.normal(size=count)
    schedule = AutoWUSchedule(total_steps=2 * count, steps_per_epoch=count, warmup_steps=count)
    times = []
    for i in range(repeats):
        start = time.process_time()
        minimum_test(losses, schedule, np.random.default_rng(i))
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500, 2000, 20000])
    args = parser.parse_args()
    torch.set_num_threads(1)

    per_step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, settings in VARIANTS.items():
            short, short_steps = run_seconds(args.steps, args.batch_size, settings)
            long, long_steps = run_seconds(3 * args.steps, args.batch_size, settings)
            per_step[name].append((long - short) / (long_steps - short_steps))
    baseline = statistics.median(per_step["cosine, no noise scale (baseline)"])
    print(f"per-step CPU time, {TASK}, batch {args.batch_size} (2 micro-batches), SGD:")
    for name, values in per_step.items():
        median = statistics.median(values)
        ratios = sorted(v / baseline - 1 for v in values)
        print(
            f"  {name:<38} {1e3 * median:7.2f} ms  {100 * (median / baseline - 1):+6.1f} % "
            f"(repeats {100 * ratios[0]:+.1f} % to {100 * ratios[-1]:+.1f} %)"
        )

    steps_per_epoch = len(get_task(TASK).train) // args.batch_size
    epoch = steps_per_epoch * baseline
    print(f"AutoWU test, CPU time (one epoch = {steps_per_epoch} steps = {1e3 * epoch:.0f} ms):")
    for count in args.counts:
        seconds = gp_test_seconds(count, args.repeats)
        print(f"  {count:>6} losses  {1e3 * seconds:7.1f} ms  = {seconds / epoch:5.2f} epochs")


if __name__ == "__main__":
    main()
