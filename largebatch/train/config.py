"""Configuration and result of one training run.

:class:`RunConfig` is what ``largebatch run`` parses its flags into and what a
sweep writes for each cell; :class:`RunResult` is what a run reports back and
what the results database stores. Both are plain, JSON-serialisable dataclasses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Scaling = Literal["none", "linear", "sqrt"]
Schedule = Literal["constant", "cosine", "poly", "step"]
Status = Literal["done", "diverged", "chance", "failed"]


@dataclass
class RunConfig:
    """Everything that determines a training run.

    Learning rate: ``lr`` is the base learning rate at ``base_batch_size``; the
    run uses it scaled by ``scaling`` to ``batch_size``. ``None`` for ``lr``,
    ``scaling`` or ``warmup_*`` means the optimizer's registry recommendation.

    Batch: ``batch_size`` is the global batch (all devices, all accumulation
    micro-steps); per-device batch = batch_size / (nproc * accumulation_steps).

    Budget: exactly one of ``epochs``, ``steps`` or ``examples`` is set; all
    schedules are defined in global optimizer steps.

    Schedule: warm-up, then ``schedule`` decay over the remaining steps;
    ``decay_power`` is the exponent of "poly" (1 = linear decay, as LAMB's BERT
    recipe), ``decay_milestones`` the fractions of the run where "step" multiplies
    the rate by ``decay_gamma``.

    Evaluation: every ``eval_every`` steps (``None``: once per epoch) on train,
    val and test, in batches of ``eval_batch_size`` (``None``: the per-device
    micro-batch). ``target`` is ``(metric, value)``, e.g. ``("accuracy", 0.9)``
    (``None``: the task's target); ``progress`` shows a progress bar on rank 0.

    Gradient noise scale: ``noise_scale`` logs B_simple (``metrics.csv`` and
    ``RunResult.extra``) from gradients the step computes anyway, which needs
    ``nproc >= 2`` or ``accumulation_steps >= 2``; ``None`` logs it when so,
    ``True`` insists, ``False`` never logs. It is measured on every
    ``noise_scale_every``-th step (a measurement costs about 0.2 ms of host time,
    which is 8-16% of a small CPU model's step). Neither changes the trained
    parameters.
    """

    task: str = "mnist1d-cnn"
    task_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    base_batch_size: int = 64
    batch_size: int = 64
    accumulation_steps: int = 1
    scaling: Scaling | None = None
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    schedule: Schedule = "cosine"
    decay_power: float = 1.0
    decay_milestones: tuple[float, ...] = (0.5, 0.75)
    decay_gamma: float = 0.1
    epochs: float | None = None
    steps: int | None = None
    examples: int | None = None
    eval_every: int | None = None
    eval_batch_size: int | None = None
    target: tuple[str, float] | None = None
    stop_at_target: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    nproc: int = 1
    out_dir: str = "runs/run"
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = False
    noise_scale: bool | None = None
    noise_scale_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        if data.get("target") is not None:
            data["target"] = tuple(data["target"])
        if data.get("decay_milestones") is not None:
            data["decay_milestones"] = tuple(data["decay_milestones"])
        return cls(**data)


@dataclass
class RunResult:
    """Outcome of a run; every field is JSON-serialisable.

    ``status`` is "done", "diverged" (non-finite loss), "chance" (finished with
    the training loss at chance level, see :mod:`largebatch.diagnostics.chance`;
    ``error`` says why) or "failed" (an exception, whose message is in ``error``
    and whose full traceback is in the file ``error_log``, inside the run
    directory). ``*_to_target`` are ``None`` if the target was never reached or
    none was set.
    """

    status: Status
    steps: int
    examples: int
    wall_time: float
    final_train_loss: float | None = None
    final_train_accuracy: float | None = None
    final_test_loss: float | None = None
    final_test_accuracy: float | None = None
    final_val_loss: float | None = None
    final_val_accuracy: float | None = None
    best_train_loss: float | None = None
    best_train_accuracy: float | None = None
    best_test_loss: float | None = None
    best_test_accuracy: float | None = None
    best_val_accuracy: float | None = None
    steps_to_target: int | None = None
    examples_to_target: int | None = None
    error: str | None = None
    error_log: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
