"""Configuration and result of one training run.

:class:`RunConfig` is what ``largebatch run`` parses its flags into and what a
sweep writes for each cell; :class:`RunResult` is what a run reports back and
what the results database stores. Both are plain, JSON-serialisable dataclasses.
A ``RunConfig`` checks itself when it is built (pure checks: no files, no
devices, no data), so a config that exists is a valid one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from largebatch.optim.classical_protocol import ClassicalStepProtocol
from largebatch.optim.decentralized.topology import TOPOLOGIES, make_topology
from largebatch.optim.registry import get_spec, is_decentralized, optimizer_arguments
from largebatch.tasks import registry as tasks
from largebatch.train.autowu import check_autowu
from largebatch.train.averaging import AveragingConfig
from largebatch.train.batch_growth import build_controller
from largebatch.train.distributed import check_device
from largebatch.train.schedules import SCALINGS, SCHEDULES, check_decay
from largebatch.utils.errors import ConfigError, UnknownNameError, unknown_name_message
from largebatch.utils.values import check_like, is_number

Scaling = Literal["none", "linear", "sqrt", "adascale"]
Schedule = Literal["constant", "cosine", "poly", "step", "autowu"]
Status = Literal["done", "diverged", "chance", "failed"]

#: the budget of a run that sets none of epochs, steps and examples
DEFAULT_EPOCHS = 10.0
#: config fields that may change when a run is resumed (none changes the trained parameters)
RESUMABLE_CHANGES = (
    "resume", "progress", "device", "out_dir", "checkpoint_every", "eval_batch_size",
    "noise_scale", "noise_scale_every",
)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a training run; invalid values raise on construction.

    Learning rate: ``lr`` is the base learning rate at ``base_batch_size``; the
    run uses it scaled by ``scaling`` to ``batch_size``. ``None`` for ``lr``,
    ``scaling`` or ``warmup_*`` means the optimizer's registry recommendation.

    Batch: ``batch_size`` is the global batch (all devices, all accumulation
    micro-steps); per-device batch = batch_size / (nproc * accumulation_steps).

    Budget: at most one of ``epochs``, ``steps`` or ``examples`` is set (none:
    :data:`DEFAULT_EPOCHS`); all schedules are defined in global optimizer steps.

    Schedule: warm-up (linear from ``warmup_start`` times the peak), then
    ``schedule`` decay over the remaining steps, down to ``decay_floor`` times the
    peak; ``decay_power`` is the exponent of "poly" (1 = linear decay, as LAMB's
    BERT recipe), ``decay_milestones`` the fractions of the run where "step"
    multiplies the rate by ``decay_gamma``.

    Adaptive rates: ``scaling="adascale"`` multiplies the rate at
    ``base_batch_size`` by the gain measured every step from the gradient
    variance (which needs ``nproc >= 2`` or ``accumulation_steps >= 2``), and
    runs until its scale-invariant progress has covered the schedule.
    ``schedule="autowu"`` searches the rate itself: an exponential warm-up from
    ``autowu_min_lr`` towards ``autowu_max_lr`` (reached after
    ``autowu_max_warmup`` of the run, the cap), ended when a Gaussian-process
    test finds the loss past its minimum, then ``autowu_decay`` ("cosine" or
    "constant-cosine") to zero; ``lr``, ``scaling`` and the warm-up and decay
    settings do not apply to it.

    Evaluation: every ``eval_every`` steps (``None``: once per epoch) on train,
    val and test, in batches of ``eval_batch_size`` (``None``: the per-device
    micro-batch). ``target`` is ``(metric, value)``, e.g. ``("accuracy", 0.9)``
    (``None``: the task's target); ``progress`` shows a progress bar on rank 0.

    Gradient noise scale: ``noise_scale`` logs B_simple (``metrics.csv`` and
    ``RunResult.extra``) from gradients the step computes anyway, which needs
    ``nproc >= 2`` or ``accumulation_steps >= 2``; ``None`` logs it when so,
    ``True`` insists, ``False`` never logs. It is measured on every
    ``noise_scale_every``-th step (each measurement costs host time: see
    docs/training.md). Neither changes the trained parameters, except through
    AdaScale, which reads the same statistics on every step.

    Decentralized optimizers (those that take a ``topology``, e.g. ``decentlam``):
    ``topology`` is the graph the ``nproc >= 2`` processes gossip over (``None``: the
    optimizer's default); it must be ``None`` for every other optimizer.

    Classical methods (docs/classical.md): ``hessian_batch_size`` is the
    Hessian sample of Newton-CG and SQN (``None``: the step's batch; no larger
    than the batch, its first examples; larger, an independent sample).
    ``batch_growth`` names a batch-size controller (``norm-test``,
    ``inner-product-test``, ``geometric``, ``increase-instead-of-decay``) that
    grows the batch from ``batch_size`` up to ``max_batch_size`` (``None``: the
    training set); ``batch_growth_theta`` is the tests' ``theta``,
    ``batch_growth_options`` the controller's other arguments and the
    statistics' ``group_size``/``chunk_size``. With a controller, an epochs or
    examples budget counts examples (the number of steps is not known in
    advance, so the schedule must be constant). ``averaging`` (``polyak`` or
    ``ema``, from step ``averaging_start``, EMA factor ``averaging_decay``)
    evaluates the averaged weights too (``avg_*`` columns); it never changes the
    trained parameters.
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
    warmup_start: float = 0.0
    decay_floor: float = 0.0
    autowu_min_lr: float = 1e-5
    autowu_max_lr: float = 1.0
    autowu_max_warmup: float = 0.5
    autowu_decay: str = "cosine"
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
    topology: str | None = None
    out_dir: str = "runs/run"
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = False
    noise_scale: bool | None = None
    noise_scale_every: int = 10
    hessian_batch_size: int | None = None
    batch_growth: str | None = None
    batch_growth_theta: float | None = None
    batch_growth_options: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int | None = None
    averaging: str | None = None
    averaging_start: int = 0
    averaging_decay: float = 0.999

    def __post_init__(self) -> None:
        _check_names(self)
        _check_sizes(self)
        _check_topology(self)
        _check_schedule(self)
        _check_rest(self)
        _check_classical(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The config of :meth:`to_dict` (or its JSON); an unknown key is a :class:`ConfigError`."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(unknown_name_message("config key", key, known))
        data = dict(data)
        if data.get("target") is not None:
            data["target"] = tuple(data["target"])
        if data.get("decay_milestones") is not None:
            data["decay_milestones"] = tuple(data["decay_milestones"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, source: str = "<config>") -> RunConfig:
        """The config in JSON ``text``: a run's ``config.json`` or ``{"config": {...}}`` or the
        fields themselves. ``source`` names the text in errors (``ConfigError``)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} is not a JSON config: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source} is not a JSON config: expected an object")
        data = data.get("config", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: 'config' is not an object")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def budget(self) -> tuple[str, float]:
        """``(name, value)`` of the budget: the one of epochs, steps, examples that is set."""
        for name in ("steps", "examples", "epochs"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "epochs", DEFAULT_EPOCHS


def _invalid(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"Invalid {name}: {value!r} ({expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_names(config: RunConfig) -> None:
    """Task and optimizer exist; the optimizer options have the types of their defaults."""
    if not isinstance(config.task, str) or not config.task:
        raise _invalid("task", config.task, "a registered name or package.module:function")
    if not isinstance(config.task_options, dict):
        raise _invalid("task_options", config.task_options, "a dict of option -> value")
    if ":" in config.task:
        tasks.split_user_task(config.task)  # importing it is left to building the task
    else:  # stored converted, so config.json and cell ids hold typed values
        converted = tasks.validated_options(config.task, config.task_options)
        object.__setattr__(config, "task_options", converted)
    if not isinstance(config.optimizer_options, dict):
        raise _invalid("optimizer_options", config.optimizer_options, "a dict of name -> value")
    options = config.optimizer_options
    if not isinstance(options.get("base", ""), str):
        raise _invalid("base", options["base"], "the name of the base optimizer")
    try:
        arguments = optimizer_arguments(config.optimizer, options.get("base"))
    except KeyError as error:
        raise UnknownNameError(error.args[0]) from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key in get_spec(config.optimizer).data_arguments:
        if key in options:
            raise ConfigError(
                f"Invalid optimizer option {key}={options[key]!r}: the run sets it from the "
                "training data"
            )
    if "lr" in options:
        raise ConfigError(
            f"Invalid optimizer option lr={options['lr']!r}. Set the learning rate with lr "
            "(--lr), not as an optimizer option: it is the rate at base_batch_size, scaled "
            "to batch_size"
        )
    for key, value in options.items():
        if key in arguments.defaults and not (value is None and key in arguments.optional):
            try:
                check_like(arguments.defaults[key], value)
            except ConfigError as error:
                raise ConfigError(f"Invalid optimizer option {key}={value!r}: {error}") from None
    if config.lr is None and arguments.lr is None and config.schedule != "autowu":
        raise ConfigError(f"Optimizer {config.optimizer!r} has no default learning rate; set lr")


def _check_sizes(config: RunConfig) -> None:
    """Batch, processes, budget and intervals are positive integers that fit together."""
    for name in (
        "batch_size",
        "base_batch_size",
        "accumulation_steps",
        "nproc",
        "noise_scale_every",
    ):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise _invalid(name, value, "must be a positive integer")
    devices_times_steps = config.nproc * config.accumulation_steps
    if config.batch_size % devices_times_steps:
        raise ConfigError(
            f"Invalid batch_size: {config.batch_size} is not divisible by "
            f"nproc x accumulation_steps = {config.nproc} x {config.accumulation_steps}"
        )
    budgets = {k: getattr(config, k) for k in ("epochs", "steps", "examples")}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) > 1:
        raise ConfigError(f"Set exactly one of epochs, steps, examples (got {given})")
    if config.epochs is not None and not (is_number(config.epochs) and config.epochs > 0):
        raise ConfigError(f"Invalid epochs: {config.epochs} (must be > 0)")
    for name in ("steps", "examples"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"Invalid {name}: {value} (must be a positive integer)")
    for name in ("eval_every", "eval_batch_size", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise _invalid(name, value, "must be a positive integer")


def _check_topology(config: RunConfig) -> None:
    """A topology for a decentralized optimizer only, one its number of processes can use."""
    options = config.optimizer_options
    decentralized = is_decentralized(config.optimizer, options.get("base"))
    if "topology" in options:
        raise ConfigError(
            f"Invalid optimizer option topology={options['topology']!r}. Set the topology "
            "with topology (--topology), not as an optimizer option"
        )
    wraps = get_spec(config.optimizer).wraps
    # a wrapper whose default base is decentralized (slowmo) takes only such bases; the
    # others (e, the extrapolation family) only bases that all-reduce
    if wraps is not None and decentralized != is_decentralized(wraps):
        kind = "an all-reduce" if decentralized else "a decentralized"
        raise ConfigError(
            f"Invalid base: {options.get('base')!r} ({config.optimizer!r} wraps {kind} optimizer)"
        )
    if config.topology is not None and not isinstance(config.topology, str):
        raise _invalid("topology", config.topology, f"one of {', '.join(TOPOLOGIES)}")
    if config.topology is not None and not decentralized:
        raise ConfigError(
            f"Invalid topology: {config.topology!r} (optimizer {config.optimizer!r} averages "
            "gradients over all processes; a topology is for a decentralized optimizer, "
            "such as dmsgd or decentlam)"
        )
    if decentralized:
        defaults = optimizer_arguments(config.optimizer, options.get("base")).defaults
        name = config.topology or defaults["topology"]
        try:
            make_topology(name, config.nproc)
        except ConfigError as error:
            raise ConfigError(f"{error}; set nproc (--nproc) to a size it can use") from None


def _check_schedule(config: RunConfig) -> None:
    """Learning rate, scaling rule, warm-up and decay."""
    if config.lr is not None and not (is_number(config.lr) and 0 < config.lr < math.inf):
        raise ConfigError(f"Invalid learning rate: {config.lr} (must be > 0)")
    if config.scaling is not None and config.scaling not in SCALINGS:
        raise _invalid("scaling", config.scaling, f"choose from {', '.join(SCALINGS)}")
    if config.schedule not in SCHEDULES:
        raise _invalid("schedule", config.schedule, f"choose from {', '.join(SCHEDULES)}")
    if config.warmup_steps is not None and config.warmup_epochs is not None:
        raise ConfigError("Set at most one of warmup_steps and warmup_epochs")
    if config.warmup_steps is not None and (
        not _is_int(config.warmup_steps) or config.warmup_steps < 0
    ):
        raise _invalid("warmup_steps", config.warmup_steps, "must be an integer >= 0")
    if config.warmup_epochs is not None and not (
        is_number(config.warmup_epochs) and config.warmup_epochs >= 0
    ):
        raise _invalid("warmup_epochs", config.warmup_epochs, "must be a number >= 0")
    if config.schedule == "autowu":
        check_autowu(
            config.autowu_min_lr, config.autowu_max_lr, config.autowu_max_warmup,
            config.autowu_decay,
        )  # fmt: skip
        _check_unset(config, _NOT_AUTOWU, "with schedule='autowu' (it sets the rate itself)")
    else:
        check_decay(
            config.schedule, config.decay_power, config.decay_milestones, config.decay_gamma,
            config.warmup_start, config.decay_floor,
        )  # fmt: skip
        _check_unset(config, _AUTOWU_ONLY, "unless schedule='autowu'")
    if config.scaling == "adascale":
        _check_adascale(config)


#: settings that only AutoWU reads, and those it replaces (it picks the rate and warm-up)
_AUTOWU_ONLY = ("autowu_min_lr", "autowu_max_lr", "autowu_max_warmup", "autowu_decay")
_NOT_AUTOWU = (
    "lr", "scaling", "warmup_steps", "warmup_epochs", "warmup_start", "decay_power",
    "decay_milestones", "decay_gamma", "decay_floor",
)  # fmt: skip


def _check_unset(config: RunConfig, names: tuple[str, ...], when: str) -> None:
    """``ConfigError`` for the first of ``names`` set to other than its default."""
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        if f.name in names and (tuple(value) if isinstance(value, list) else value) != f.default:
            raise ConfigError(f"Invalid {f.name}: {value!r} has no effect {when}; leave it unset")


def _check_adascale(config: RunConfig) -> None:
    """AdaScale needs a source of gradient variance."""
    if config.noise_scale is False:
        raise ConfigError(
            "Invalid noise_scale: False with scaling='adascale', whose gain comes from the "
            "gradient noise statistics; leave noise_scale unset"
        )
    if config.nproc == 1 and config.accumulation_steps == 1:
        raise ConfigError(
            "Invalid scaling: 'adascale' has no gradient variance to measure in one process "
            "without accumulation (no variance source); set nproc >= 2 or accumulation_steps >= 2"
        )


def _check_rest(config: RunConfig) -> None:
    """Target, seed, device, output directory, switches and the noise scale."""
    target = config.target
    if target is not None and not (
        isinstance(target, tuple | list)
        and len(target) == 2
        and isinstance(target[0], str)
        and is_number(target[1])
    ):
        raise _invalid("target", target, "expected (metric, value), e.g. ('accuracy', 0.9)")
    if not _is_int(config.seed) or not 0 <= config.seed < 2**32:
        raise _invalid("seed", config.seed, "must be an integer in [0, 2**32)")
    if not isinstance(config.device, str):
        raise _invalid("device", config.device, "auto, cpu, cuda or cuda:N")
    check_device(config.device)
    if not isinstance(config.out_dir, str) or not config.out_dir:
        raise _invalid("out_dir", config.out_dir, "a directory path")
    for name in ("stop_at_target", "bf16", "resume", "progress"):
        if not isinstance(getattr(config, name), bool):
            raise _invalid(name, getattr(config, name), "True or False")
    if config.noise_scale not in (None, True, False):
        raise _invalid("noise_scale", config.noise_scale, "None, True or False")
    if config.noise_scale and config.nproc == 1 and config.accumulation_steps == 1:
        raise ConfigError(
            "noise_scale=True needs two gradients of different batch sizes per step: "
            "set nproc >= 2 or accumulation_steps >= 2"
        )


def _check_classical(config: RunConfig) -> None:
    """The Hessian sample, one-process optimizers, batch growth and averaging."""
    size = config.hessian_batch_size
    if size is not None and (not _is_int(size) or size < 1 or size % config.nproc):
        raise _invalid(
            "hessian_batch_size",
            size,
            f"must be a positive integer divisible by nproc={config.nproc}",
        )
    protocol = getattr(get_spec(config.optimizer).load(), "step_protocol", None)
    classical = protocol if isinstance(protocol, ClassicalStepProtocol) else None
    if size is not None and not (classical and classical.hessian_sample):
        raise ConfigError(
            f"Invalid hessian_batch_size: {size} (optimizer {config.optimizer!r} takes no "
            "Hessian sample; newton-cg and sqn do)"
        )
    if classical and classical.per_example and config.nproc > 1:
        raise ConfigError(
            f"Optimizer {config.optimizer!r} runs in one process (nproc={config.nproc}): its "
            "per-example table would have to follow every example from process to process"
        )
    _check_batch_growth(config)
    if config.averaging is not None and not isinstance(config.averaging, str):
        raise _invalid("averaging", config.averaging, "None, 'polyak' or 'ema'")
    try:
        AveragingConfig(
            config.averaging or "polyak", config.averaging_start, config.averaging_decay
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.averaging is not None and is_decentralized(
        config.optimizer, config.optimizer_options.get("base")
    ):
        raise ConfigError(
            f"Invalid averaging: {config.averaging!r} with the decentralized optimizer "
            f"{config.optimizer!r} (each process would average its own iterates, and "
            "evaluation needs one model); leave averaging unset"
        )


def _check_batch_growth(config: RunConfig) -> None:
    if not isinstance(config.batch_growth_options, dict):
        raise _invalid(
            "batch_growth_options", config.batch_growth_options, "a dict of name -> value"
        )
    if config.batch_growth is None:
        unused = {
            name: getattr(config, name)
            for name in ("batch_growth_theta", "max_batch_size", "batch_growth_options")
            if getattr(config, name) not in (None, {})
        }
        if unused:
            raise ConfigError(
                f"Invalid batch growth settings {unused}: set batch_growth to use them"
            )
        return
    if not isinstance(config.batch_growth, str):
        raise _invalid("batch_growth", config.batch_growth, "the name of a batch-size controller")
    maximum = config.max_batch_size
    if maximum is not None and (not _is_int(maximum) or maximum < config.batch_size):
        raise _invalid(
            "max_batch_size", maximum, f"must be an integer >= batch_size={config.batch_size}"
        )
    theta = config.batch_growth_theta
    if theta is not None and not is_number(theta):
        raise _invalid("batch_growth_theta", theta, "must be a number > 0")
    try:
        build_controller(
            config.batch_growth,
            theta,
            config.batch_growth_options,
            initial=config.batch_size,
            max_batch_size=maximum or config.batch_size,
            processes=config.nproc,
            accumulation_steps=config.accumulation_steps,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None
    if config.noise_scale:
        raise ConfigError(
            "noise_scale=True with batch_growth: the noise scale's two batch sizes change "
            "every step; the controller's statistics log the test instead"
        )
    if config.scaling == "adascale":
        raise ConfigError(
            f"Invalid scaling: 'adascale' with batch_growth={config.batch_growth!r} (AdaScale "
            "scales the rate of one fixed batch size by the gradient noise measured at it, "
            "which batch growth does not measure); use one or the other"
        )
    if config.budget()[0] != "steps" and config.schedule != "constant":
        raise ConfigError(
            f"Invalid schedule: {config.schedule!r} with batch_growth={config.batch_growth!r} "
            f"and a budget in {config.budget()[0]} (the number of steps is not known in "
            "advance); use schedule='constant' or a budget in steps"
        )


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
