"""The adaptive schedules on a CUDA device: exact resume, the range test, per-step cost.

Checks (each prints one line, ``ok`` or ``FAIL``):

1. AutoWU on the GPU (loss tensors kept on the device, one transfer per epoch):
   a run that dies during the warm-up and is resumed switches at the same step
   with the same peak and the same losses as the uninterrupted run.
2. AdaScale on the GPU (accumulation 4): the same for its gain and progress.
3. The range test on the GPU, on the quadratic of ``tests/train``: the blow-up
   within 20 % of 2 / L.

Then the wall time per step on the device of ``train`` on teacher-student (a
wider MLP), accumulation 2: fixed cosine schedule without noise-scale logging
against AdaScale (statistics and one host sync per step) and AutoWU, from the
difference of two run lengths, repeats interleaved.

Run from the repository root (it imports the test tasks of ``tests/train``):
``python benchmarks/adaptive_schedules_gpu.py``; exit status 1 if a check fails.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from largebatch.train import RunConfig, train
from largebatch.train.lr_finder import RangeTestSettings, range_test

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "train"))

from quadratic_task import build as build_quadratic  # noqa: E402
from tiny_train_task import TINY_TASK, build  # noqa: E402


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def killed_and_resumed(
    root: Path, fields: dict, fail_after: int, keys: tuple[str, ...]
) -> tuple[bool, str]:
    """Train; train again, killed after ``fail_after`` forward passes, and resume; compare."""
    common = dict(task=TINY_TASK, optimizer="sgd", device="cuda", eval_every=1,
                  checkpoint_every=4, **fields)  # fmt: skip
    reference = train(RunConfig(**common, out_dir=str(root / "reference")))
    failed = train(
        RunConfig(**common, out_dir=str(root / "resumed")), task=build(fail_after=fail_after)
    )
    resumed = train(RunConfig(**common, out_dir=str(root / "resumed"), resume=True), task=build())
    same = failed.status == "failed" and resumed.steps == reference.steps
    same = same and all(resumed.extra.get(k) == reference.extra.get(k) for k in keys)
    detail = ", ".join(f"{k}={resumed.extra.get(k)!r} vs {reference.extra.get(k)!r}" for k in keys)
    return same, detail


def per_step_seconds(settings: dict, steps: int) -> float:
    """Wall time per step on the device from a ``steps`` and a ``3 x steps`` budget."""
    times = []
    for budget in (steps, 3 * steps):
        with tempfile.TemporaryDirectory() as out:
            fields = dict(
                task="teacher-student", task_options={"student_hidden": 1024, "input_dim": 256},
                optimizer="sgd", lr=0.05, batch_size=1024, base_batch_size=256,
                accumulation_steps=2, warmup_steps=0, steps=budget, eval_every=budget,
                device="cuda", out_dir=out,
            )  # fmt: skip
            config = RunConfig(**{**fields, **settings})
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = train(config)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start, result.steps))
    (short, short_steps), (long, long_steps) = times
    return (long - short) / (long_steps - short_steps)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        autowu = dict(batch_size=16, schedule="autowu", autowu_min_lr=1e-4,
                      autowu_max_lr=100.0, steps=120)  # fmt: skip
        keys = ("autowu_switch_step", "autowu_peak_lr", "autowu_tests")
        same, detail = killed_and_resumed(root / "autowu", autowu, 22, keys)
        results.append(check("AutoWU resume on cuda", same, detail))
        adascale = dict(lr=0.05, batch_size=64, base_batch_size=16, accumulation_steps=4,
                        scaling="adascale", warmup_steps=2, steps=12)  # fmt: skip
        keys = ("adascale_gain", "scale_invariant_steps")
        same, detail = killed_and_resumed(root / "adascale", adascale, 4 * 9, keys)
        results.append(check("AdaScale resume on cuda", same, detail))
    limit = 0.5
    config = RunConfig(
        task="quadratic_task:build", optimizer="sgd",
        optimizer_options={"momentum": 0.0, "weight_decay": 0.0}, lr=1e-3, scaling="none",
        batch_size=32, base_batch_size=32, steps=10, warmup_steps=0, device="cuda",
        out_dir="unused",
    )  # fmt: skip
    found = range_test(config, RangeTestSettings(0.05 * limit, 5 * limit, 1200), build_quadratic())
    ratio = found.blow_up_lr / limit
    results.append(
        check("range test on cuda", 0.8 <= ratio <= 1.2, f"blow-up at {ratio:.3f} x 2/L")
    )

    variants = {
        "cosine, no noise scale": dict(noise_scale=False),
        "adascale": dict(scaling="adascale"),
        "autowu": dict(lr=None, warmup_steps=None, schedule="autowu", autowu_max_lr=0.5,
                       base_batch_size=1024),
    }  # fmt: skip
    timings = {name: [] for name in variants}
    per_step_seconds(variants["cosine, no noise scale"], 20)  # warm-up: CUDA context, kernels
    for _ in range(3):
        for name, settings in variants.items():
            timings[name].append(per_step_seconds(settings, 100))
    baseline = statistics.median(timings["cosine, no noise scale"])
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<24} {1e3 * median:7.3f} ms/step  {100 * (median / baseline - 1):+6.1f} %  "
              f"({', '.join(f'{1e3 * v:.3f}' for v in values)})", flush=True)  # fmt: skip
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
