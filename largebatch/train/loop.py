"""The training loop: ``train(config) -> RunResult``.

Read :func:`_train` top to bottom: set-up (task, plan, data, model, optimizer
and schedule: everything that can reject the run, before anything is written),
the run directory (locked, checked, resumed), then the loop (one global batch
per optimizer step, driven by the optimizer's step protocol), evaluation,
target, checkpoint and result. Under data parallelism every process runs this
same code (see ``distributed.py`` and ``launch.py``); with a decentralized
optimizer, ``decentralized.py`` evaluates the processes' average and checkpoints
each process. The gradient noise scale is read off the gradients as they pass
(``noise_scale.py``). What a step does for each optimizer's protocol is
``step.py``; a growing batch (``batch_growth.py``) and an iterate average
(``averaging.py``) are small objects called at named points, which do nothing
when the run does not ask for them.

A step never waits for the device: the data are indexed where they live
(``data.py``), and the losses stay on the device until the loop reads them, at
evaluations, checkpoints and every few steps (``step_losses.py``), where it
also checks them for divergence.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from largebatch.diagnostics.chance import chance_level
from largebatch.diagnostics.evaluation import evaluate
from largebatch.tasks import get_task
from largebatch.tasks.base import Task
from largebatch.train import distributed
from largebatch.train.averaging import Averaging
from largebatch.train.batch_growth import BatchGrowth
from largebatch.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from largebatch.train.config import RunConfig, RunResult
from largebatch.train.data import BatchStream, place_task_data, shard_batches
from largebatch.train.decentralized import DecentralizedRun, own_state
from largebatch.train.distributed import Distributed
from largebatch.train.divergence import Divergence
from largebatch.train.noise_scale import NoiseScaleMonitor
from largebatch.train.plan import RunPlan, build_optimizer, build_scheduler, plan_run
from largebatch.train.run_dir import RunDirectory
from largebatch.train.step import StepDriver, statistics_columns, statistics_row
from largebatch.train.step_losses import StepLoss, StepLosses


@dataclass
class Progress:
    """How far a run has got; with model, optimizer and schedule, all a checkpoint holds.

    ``batches_drawn`` and ``examples_drawn`` count global batches and examples read
    from the data (more than ``step`` batches for optimizers whose closure wants
    fresh batches); ``example_gradients`` is the cost in example gradients
    (``step.py``); ``loss_sum``/``loss_count`` accumulate training losses since
    the last evaluation.
    """

    step: int = 0
    batches_drawn: int = 0
    examples_drawn: int = 0
    gradient_evaluations: int = 0
    example_gradients: float = 0.0
    elapsed: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_eval_step: int | None = None
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    steps_to_target: int | None = None
    examples_to_target: int | None = None


def train(config: RunConfig, task: Task | None = None, plan: RunPlan | None = None) -> RunResult:
    """Train as ``config`` says and return the outcome (also written to ``result.json``).

    ``task`` replaces ``config.task`` by a :class:`Task` built in code; ``plan`` is
    ``plan_run(config, task)`` when the caller has made it (a sweep, for each cell),
    so the run is not planned twice. Whatever
    can reject the run (the task, the plan, the device, the optimizer's
    hyperparameters, a run directory in use or holding another run, unusable
    checkpoints) raises before anything is written: the errors of
    :mod:`largebatch.utils.errors`, or the optimizer's own ``ValueError`` /
    ``TypeError``. Once training runs, a non-finite loss ends it as "diverged" and
    an exception as "failed", and a run that ends no better on the training set
    than predicting the class frequencies (:mod:`largebatch.diagnostics.chance`)
    as "chance"; all three are returned rather than raised.
    """
    ddp = distributed.setup(config.device)
    try:
        return _train(config, task, plan, ddp)
    finally:
        distributed.teardown(ddp)


def _train(
    config: RunConfig, task: Task | None, plan: RunPlan | None, ddp: Distributed
) -> RunResult:
    # --- set-up: task, plan, seeds, data, model, optimizer (nothing is written yet) ---
    task = task if task is not None else get_task(config.task, **config.task_options)
    plan = plan if plan is not None else plan_run(config, task, ddp.world_size)
    task = place_task_data(task, ddp.device)
    seed_everything(config.seed)
    autocast = (
        partial(torch.autocast, ddp.device.type, torch.bfloat16)
        if config.bf16
        else contextlib.nullcontext
    )
    # one seeded permutation per epoch, each process reads its shard
    sampler = DistributedSampler(
        task.train, ddp.world_size, ddp.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    stream = BatchStream(
        task.train, sampler, plan.micro_batch_size, plan.accumulation_steps, ddp.device
    )
    model = task.build_model().to(ddp.device)
    optimizer, protocol = build_optimizer(config, plan, model)
    # a decentralized optimizer averages parameters itself: no gradient all-reduce
    ddp_model = distributed.wrap(model, ddp, sync_gradients=not protocol.local_gradients)
    noise = NoiseScaleMonitor.for_run(config, plan, protocol, ddp_model, ddp.device)
    scheduler = build_scheduler(plan, optimizer, noise, ddp)  # AdaScale reads noise's averages
    decentralized = DecentralizedRun.for_run(protocol, optimizer, model, ddp)
    stepper = StepDriver(
        model, optimizer, task.loss_fn, train_model=ddp_model, autocast=autocast,
        hessian_batch_size=config.hessian_batch_size, full_pass_batch_size=plan.eval_batch_size,
    )  # fmt: skip
    growth = BatchGrowth.for_run(
        config.batch_growth, config.batch_growth_theta, config.batch_growth_options,
        batch_size=plan.batch_size, max_batch_size=plan.max_batch_size, processes=ddp.world_size,
        accumulation_steps=plan.accumulation_steps, model=model,
    )  # fmt: skip
    averaging = Averaging.for_run(
        model, config.averaging, config.averaging_start, config.averaging_decay
    )
    evaluate_model = partial(
        evaluate_splits, task=task, batch_size=plan.eval_batch_size, ddp=ddp, autocast=autocast
    )
    train_shard = partial(  # this process's share of the training set, for batch-norm statistics
        shard_batches, task.train, plan.eval_batch_size, ddp.rank, ddp.world_size, ddp.device
    )

    # --- the run directory: locked and checked by rank 0, resumed if asked ---------------
    run_dir = RunDirectory(config.out_dir, enabled=ddp.is_main)
    with claimed(run_dir, config, ddp):
        saved = newest_checkpoint(run_dir, ddp) if config.resume else None
        run_dir.write_config(config, plan)
        progress = Progress()
        if saved is not None:
            own = own_state(saved, ddp.rank)  # each rank's own, in decentralized training
            model.load_state_dict(own["model"])
            optimizer.load_state_dict(own["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            progress = Progress(**saved["progress"])
            if "noise_scale" in saved:  # absent from checkpoints of earlier versions
                noise.load_state_dict(saved["noise_scale"])
            set_rng_state(saved["rng"][ddp.rank])
            stream.position = progress.batches_drawn
            if "data" in saved:  # absent from checkpoints of earlier versions
                stream.load_state_dict(saved["data"])
            growth.load_state_dict(saved.get("batch_growth", {}))
            averaging.load_state_dict(saved.get("averaging", {}))
            progress.examples_drawn = stream.examples
        saved_step = progress.step if saved is not None else None
        columns = metric_columns(task)
        columns += averaging.columns(columns) + growth.columns + statistics_columns(optimizer)
        columns += noise.columns + decentralized.columns + list(scheduler.columns)
        run_dir.open_metrics(columns, resume_step=saved_step, step_columns=growth.step_columns)
        clock_start = time.perf_counter() - progress.elapsed  # wall time continues across resumes

        def save() -> None:
            """Write a checkpoint (every process hands its RNG state to rank 0, which writes)."""
            progress.elapsed = time.perf_counter() - clock_start
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": asdict(progress),
                "rng": distributed.gather_objects(rng_state(), ddp),
                "noise_scale": noise.state_dict(),
                "data": stream.state_dict(),  # the same on every process
                "batch_growth": growth.state_dict(),
                "averaging": averaging.state_dict(),
                **decentralized.checkpoint_state(),  # every rank's model; "model": their average
            }
            if ddp.is_main:
                save_checkpoint(run_dir.checkpoints, progress.step, state)

        def evaluate_and_log() -> bool:
            """Evaluate, log a row; False if the training loss is no longer finite."""
            with decentralized.averaged():  # the ranks' average model, if they differ
                metrics = evaluate_model(model)
            averaged = averaging.row(evaluate_model, train_shard)  # the averaged weights, if any
            progress.elapsed = time.perf_counter() - clock_start
            record_evaluation(progress, metrics, plan)
            row = metrics_row(progress, metrics, scheduler.get_last_lr()[0] * growth.lr_scale, plan)
            row |= averaged | growth.row() | statistics_row(optimizer) | noise.row()
            run_dir.log(row | decentralized.row() | scheduler.row(), steps=growth.step_rows())
            progress.loss_sum, progress.loss_count = 0.0, 0
            return math.isfinite(metrics["train"]["loss"])

        def finished() -> bool:
            """The budget is spent: the steps, the examples (a growing batch), AdaScale's schedule."""
            return plan.finished(progress.step, progress.examples_drawn) or scheduler.finished

        losses = StepLosses(ddp)

        def read_losses(all_processes: bool = True) -> StepLoss | None:
            """Add the losses since the last read to the progress; the first non-finite one."""
            for loss in losses.read(all_processes):
                if not math.isfinite(loss.value):
                    return loss
                progress.loss_sum += loss.value
                progress.loss_count += 1
            if not bar.disable:
                bar.set_postfix(progress_postfix(progress), refresh=False)
            return None

        # --- the loop: one global batch per optimizer step ------------------------------------
        bar = tqdm(
            total=plan.total_steps, initial=progress.step, unit="step", dynamic_ncols=True,
            disable=not (config.progress and ddp.is_main),
        )  # fmt: skip
        status, error, error_log, divergence = "done", None, None, None
        try:
            if progress.last_eval_step is None and not evaluate_and_log():
                status = "diverged"
                divergence = Divergence.at_evaluation(progress.step, model, task, plan, ddp)
            while status == "done" and not finished() and not stop_now(progress, config):
                sqnorms = noise.begin_step(progress.step)
                outcome = stepper.step(
                    stream, growth.batch_size, statistics=growth.request, sqnorms=sqnorms
                )
                noise.update(progress.step, sqnorms)
                scheduler.step(outcome.loss)  # the next step's rate (AutoWU keeps the losses)
                growth.update(progress.step, outcome.statistics, optimizer)  # the next batch size
                averaging.update(model, progress.step + 1)
                read = stream.examples - progress.examples_drawn  # by this step
                progress.step += 1
                progress.batches_drawn = stream.position
                progress.examples_drawn = stream.examples
                progress.gradient_evaluations += outcome.gradient_evaluations
                progress.example_gradients += outcome.example_gradients
                losses.append(progress.step, outcome.batch, outcome.loss)
                bar.update()
                evaluation_due = (
                    plan.evaluation_due(progress.step, progress.examples_drawn, read) or finished()
                )
                checkpoint_due = (
                    config.checkpoint_every and progress.step % config.checkpoint_every == 0
                )
                if evaluation_due or checkpoint_due or losses.full:
                    bad = read_losses()
                    if bad is not None:
                        status = "diverged"
                        batches = stream.at(bad.batch)
                        divergence = Divergence.at_step(bad, batches, model, progress.step, ddp)
                        break
                if evaluation_due and not evaluate_and_log():
                    status = "diverged"
                    divergence = Divergence.at_evaluation(progress.step, model, task, plan, ddp)
                    break
                if checkpoint_due:
                    save()
                    saved_step = progress.step
            if status == "done" and saved_step != progress.step:
                save()
        except Exception as exception:  # a failed run is a result, not a crash
            status, error = "failed", f"{type(exception).__name__}: {exception}"
            error_log = str(run_dir.write_error(traceback.format_exc(), ddp.rank))
            with contextlib.suppress(Exception):  # had it diverged first? (a broken device raises)
                bad = read_losses(all_processes=False)  # no collective: others may be stuck
                if bad is not None:
                    status, divergence = "diverged", Divergence.before_failure(bad)
        finally:
            bar.close()
        progress.elapsed = time.perf_counter() - clock_start
        chance = chance_level(task) if status == "done" else None
        if chance is not None and chance.reached_by(progress.last_eval["train"]):
            status, error = "chance", chance.describe(progress.last_eval["train"])

        if divergence is not None:
            error = divergence.describe() + (f"; then {error}" if error else "")
        measured = noise.result() | decentralized.result() | scheduler.summary()
        measured |= growth.result() | averaging.result()
        result = make_result(status, error, progress, plan, measured)
        if divergence is not None:
            result.extra["divergence"] = asdict(divergence)
        result.error_log = error_log
        run_dir.write_result(result)
        run_dir.close()
        return result


@contextlib.contextmanager
def claimed(run_dir: RunDirectory, config: RunConfig, ddp: Distributed) -> Iterator[None]:
    """Rank 0 holds the run directory (locked, checked) for the enclosed block."""
    distributed.on_rank_zero(ddp, run_dir.claim, config)
    try:
        yield
    finally:
        run_dir.release()


def newest_checkpoint(run_dir: RunDirectory, ddp: Distributed) -> dict[str, Any] | None:
    """The state of the run directory's newest usable checkpoint on every process, if any.

    Rank 0 finds it (setting unusable newer ones aside); the others load the same file.
    """
    found = None

    def find() -> Path | None:
        nonlocal found
        found = run_dir.latest_checkpoint()
        return None if found is None else found[1]

    path = distributed.on_rank_zero(ddp, find)
    if path is None:
        return None
    return found[0] if found is not None else load_checkpoint(path)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) identically on every process."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global generator user code draws from)
    torch.manual_seed(seed)


def evaluate_splits(
    model: nn.Module, task: Task, batch_size: int, ddp: Distributed, autocast: Callable
) -> dict[str, dict[str, float]]:
    """Loss and metrics of ``model`` on every split: ``{"train": {"loss": ..}, ..}``.

    Each process evaluates every ``world_size``-th example (in eval mode);
    :func:`~largebatch.diagnostics.evaluation.evaluate` all-reduces the sums.
    """
    splits = {"train": task.train, "val": task.val, "test": task.test}
    return {
        split: evaluate(
            model,
            task.loss_fn,
            shard_batches(dataset, batch_size, ddp.rank, ddp.world_size, ddp.device),
            task.metrics,
            autocast=autocast,
        )
        for split, dataset in splits.items()
        if dataset is not None
    }


def record_evaluation(
    progress: Progress, metrics: dict[str, dict[str, float]], plan: RunPlan
) -> None:
    """Keep the latest and best values, and note when the target is first reached."""
    progress.last_eval_step = progress.step
    progress.last_eval = metrics
    for split, values in metrics.items():
        for name, value in values.items():
            key = f"{split}_{name}"
            better = min if name == "loss" else max
            progress.best[key] = better(progress.best.get(key, value), value)
    target = plan.target
    if target is not None and progress.steps_to_target is None and target.reached(metrics):
        progress.steps_to_target = progress.step
        progress.examples_to_target = progress.examples_drawn


def stop_now(progress: Progress, config: RunConfig) -> bool:
    """Stop early once the target is reached, if asked to."""
    return config.stop_at_target and progress.steps_to_target is not None


def metric_columns(task: Task) -> list[str]:
    """The columns of ``metrics.csv``."""
    splits = ["train"] + (["val"] if task.val is not None else []) + ["test"]
    names = ["loss", *task.metrics]
    return [
        "step", "epoch", "examples", "gradient_evaluations", "example_gradients", "lr", "time",
        "batch_loss", *(f"{split}_{name}" for split in splits for name in names),
    ]  # fmt: skip


def metrics_row(
    progress: Progress,
    metrics: dict[str, dict[str, float]],
    lr: float,
    plan: RunPlan,
) -> dict[str, float]:
    """One ``metrics.csv`` row for the evaluation just done."""
    row = {
        "step": progress.step,
        "epoch": progress.examples_drawn / (plan.steps_per_epoch * plan.batch_size),
        "examples": progress.examples_drawn,
        "gradient_evaluations": progress.gradient_evaluations,
        "example_gradients": progress.example_gradients,
        "lr": lr,
        "time": progress.elapsed,
        "batch_loss": progress.loss_sum / progress.loss_count if progress.loss_count else "",
    }
    for split, values in metrics.items():
        row.update({f"{split}_{name}": value for name, value in values.items()})
    return row


def progress_postfix(progress: Progress) -> dict[str, str]:
    """What the progress bar shows besides the ETA: recent loss, latest accuracy."""
    postfix = {"loss": f"{progress.loss_sum / max(progress.loss_count, 1):.4f}"}
    split = "val" if "val" in progress.last_eval else "test"
    accuracy = progress.last_eval.get(split, {}).get("accuracy")
    if accuracy is not None:
        postfix[f"{split}_acc"] = f"{accuracy:.4f}"
    return postfix


def make_result(
    status: str,
    error: str | None,
    progress: Progress,
    plan: RunPlan,
    measured: dict[str, Any],
) -> RunResult:
    """The :class:`RunResult`: final values from the last evaluation (none if diverged).

    ``measured`` (the monitors' final values: noise scale, consensus, what the
    learning-rate scheduler reports, batch growth and averaging) goes into ``extra``.
    """
    examples = progress.examples_drawn
    fields = {}
    if status != "diverged":
        for split, values in progress.last_eval.items():
            fields.update({f"final_{split}_{k}": v for k, v in values.items()})
    fields.update({f"best_{key}": value for key, value in progress.best.items()})
    known = RunResult.__dataclass_fields__
    return RunResult(
        status=status,
        steps=progress.step,
        examples=examples,
        wall_time=progress.elapsed,
        steps_to_target=progress.steps_to_target,
        examples_to_target=progress.examples_to_target,
        error=error,
        **{key: value for key, value in fields.items() if key in known},
        extra={
            "lr": plan.lr,
            "total_steps": plan.total_steps,
            "warmup_steps": plan.schedule.warmup_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "world_size": plan.world_size,
            "gradient_evaluations": progress.gradient_evaluations,
            "example_gradients": progress.example_gradients,
            "effective_passes": progress.example_gradients / plan.num_train,
            "examples_per_second": examples / progress.elapsed if progress.elapsed else None,
            "final": progress.last_eval if status != "diverged" else {},
            "best": progress.best,
            **measured,
        },
    )
