"""The training loop: ``train(config) -> RunResult``.

Read :func:`_train` top to bottom: set-up (task, plan, data, model, optimizer
and schedule: everything that can reject the run, before anything is written),
the run directory (locked, checked, resumed), then the loop (one global batch
per optimizer step, driven by the optimizer's step protocol), evaluation,
target, checkpoint and result. Under data parallelism every process runs this
same code (see ``distributed.py`` and ``launch.py``); with a decentralized
optimizer, ``decentralized.py`` evaluates the processes' average and checkpoints
each process. The gradient noise scale is read off the gradients as they pass
(``noise_scale.py``).

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
from largebatch.diagnostics.noise_scale import gradient_sqnorm
from largebatch.optim import StepProtocol
from largebatch.tasks import get_task
from largebatch.tasks.base import Task
from largebatch.train import distributed
from largebatch.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from largebatch.train.config import RunConfig, RunResult
from largebatch.train.data import Batch, BatchStream, place_task_data, shard_batches
from largebatch.train.decentralized import DecentralizedRun, own_state
from largebatch.train.distributed import Distributed
from largebatch.train.divergence import Divergence
from largebatch.train.noise_scale import NoiseScaleMonitor
from largebatch.train.plan import RunPlan, build_optimizer, build_scheduler, plan_run
from largebatch.train.run_dir import RunDirectory
from largebatch.train.step_losses import StepLoss, StepLosses


@dataclass
class Progress:
    """How far a run has got; with model, optimizer and schedule, all a checkpoint holds.

    ``batches_drawn`` counts global batches read from the data (more than ``step``
    for optimizers whose closure wants fresh batches); ``loss_sum``/``loss_count``
    accumulate training losses since the last evaluation.
    """

    step: int = 0
    batches_drawn: int = 0
    gradient_evaluations: int = 0
    elapsed: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_eval_step: int | None = None
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    steps_to_target: int | None = None
    examples_to_target: int | None = None


def train(config: RunConfig, task: Task | None = None) -> RunResult:
    """Train as ``config`` says and return the outcome (also written to ``result.json``).

    ``task`` replaces ``config.task`` by a :class:`Task` built in code. Whatever
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
        return _train(config, task, ddp)
    finally:
        distributed.teardown(ddp)


def _train(config: RunConfig, task: Task | None, ddp: Distributed) -> RunResult:
    # --- set-up: task, plan, seeds, data, model, optimizer (nothing is written yet) ---
    task = task if task is not None else get_task(config.task, **config.task_options)
    plan = plan_run(config, task, ddp.world_size)
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
        saved_step = progress.step if saved is not None else None
        columns = (
            metric_columns(task) + noise.columns + decentralized.columns + list(scheduler.columns)
        )
        run_dir.open_metrics(columns, resume_step=saved_step)
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
                **decentralized.checkpoint_state(),  # every rank's model; "model": their average
            }
            if ddp.is_main:
                save_checkpoint(run_dir.checkpoints, progress.step, state)

        def evaluate_and_log() -> bool:
            """Evaluate, log a row; False if the training loss is no longer finite."""
            with decentralized.averaged():  # the ranks' average model, if they differ
                metrics = evaluate_splits(model, task, plan.eval_batch_size, ddp, autocast)
            progress.elapsed = time.perf_counter() - clock_start
            record_evaluation(progress, metrics, plan)
            row = metrics_row(progress, metrics, scheduler.get_last_lr()[0], plan)
            run_dir.log(row | noise.row() | decentralized.row() | scheduler.row())
            progress.loss_sum, progress.loss_count = 0.0, 0
            return math.isfinite(metrics["train"]["loss"])

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
            while (
                status == "done"
                and progress.step < plan.total_steps
                and not scheduler.finished  # AdaScale: its progress has covered the schedule
                and not stop_now(progress, config)
            ):
                sqnorms = noise.begin_step(progress.step)
                first_batch = stream.position
                loss, evaluations = optimizer_step(
                    ddp_model, optimizer, protocol, stream, task.loss_fn, autocast, sqnorms
                )
                noise.update(progress.step, sqnorms)
                scheduler.step(loss.detach())  # the next step's rate (AutoWU keeps the losses)
                progress.step += 1
                progress.batches_drawn = stream.position
                progress.gradient_evaluations += evaluations
                losses.append(progress.step, first_batch, loss)
                bar.update()
                last = progress.step == plan.total_steps or scheduler.finished
                evaluation_due = progress.step % plan.eval_every == 0 or last
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


def forward_backward(
    model: nn.Module,
    micro_batches: list[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable,
    sync: bool = True,
    sqnorms: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Accumulate in ``.grad`` the gradient of the mean loss over ``micro_batches``.

    Each micro-batch's loss is divided by their number, so the sum of their
    gradients is the gradient of the global batch. Under DDP, gradients are
    averaged across processes on the last micro-batch only, and not at all
    unless ``sync``. Returns this process's mean loss.

    ``sqnorms``, if given, receives the squared norms of the first micro-batch's
    gradient (as if alone) and of the whole batch's: the noise-scale estimate's
    two batch sizes, read without changing the gradients.
    """
    count = len(micro_batches)
    total = None
    for i, (inputs, targets) in enumerate(micro_batches):
        with distributed.no_sync(model, skip_sync=not (sync and i == count - 1)):
            with autocast():
                loss = loss_fn(model(inputs), targets)
                if count > 1:
                    loss = loss / count
            loss.backward()
        if sqnorms is not None and i == 0:
            sqnorms.append(gradient_sqnorm(model.parameters()) * count**2)
        total = loss.detach() if total is None else total + loss.detach()
    if sqnorms is not None:
        sqnorms.append(gradient_sqnorm(model.parameters()))
    return total


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    protocol: StepProtocol,
    stream: BatchStream,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable,
    sqnorms: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """One update from the next global batch, as the optimizer's protocol asks.

    Standard optimizers: gradient, then ``step()``. Closure optimizers also get
    ``step(closure)``, the closure recomputing the gradient on the same batch or
    on a fresh one. Returns the loss at the current parameters (a tensor, not read)
    and the number of gradient evaluations (forward/backward passes over a global
    batch). ``sqnorms`` goes to the first gradient's :func:`forward_backward`.
    """
    micro_batches = stream.next()
    evaluations = 0
    loss = None
    optimizer.zero_grad(set_to_none=True)
    if protocol.gradient_before_step:
        loss = forward_backward(
            model, micro_batches, loss_fn, autocast, not protocol.local_first_gradient, sqnorms
        )
        evaluations += 1
    if protocol.closure is None:
        optimizer.step()
        return loss, evaluations

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad(set_to_none=True)
        batches = micro_batches if protocol.closure == "same" else stream.next()
        return forward_backward(model, batches, loss_fn, autocast)

    closure_loss = optimizer.step(closure)
    loss = loss if loss is not None else torch.as_tensor(closure_loss)
    return loss, evaluations


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
        progress.examples_to_target = progress.batches_drawn * plan.batch_size


def stop_now(progress: Progress, config: RunConfig) -> bool:
    """Stop early once the target is reached, if asked to."""
    return config.stop_at_target and progress.steps_to_target is not None


def metric_columns(task: Task) -> list[str]:
    """The columns of ``metrics.csv``."""
    splits = ["train"] + (["val"] if task.val is not None else []) + ["test"]
    names = ["loss", *task.metrics]
    return [
        "step", "epoch", "examples", "gradient_evaluations", "lr", "time", "batch_loss",
        *(f"{split}_{name}" for split in splits for name in names),
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
        "epoch": progress.batches_drawn / plan.steps_per_epoch,
        "examples": progress.batches_drawn * plan.batch_size,
        "gradient_evaluations": progress.gradient_evaluations,
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

    ``measured`` (the monitors' final values: noise scale, consensus, and what the
    learning-rate scheduler reports) goes into ``extra``.
    """
    examples = progress.batches_drawn * plan.batch_size
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
            "examples_per_second": examples / progress.elapsed if progress.elapsed else None,
            "final": progress.last_eval if status != "diverged" else {},
            "best": progress.best,
            **measured,
        },
    )
