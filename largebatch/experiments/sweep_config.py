"""A sweep definition, from command-line flags or a TOML file, and its cells.

A sweep is a grid: batch sizes x optimizers x seeds, optionally x learning rates,
schedules, scaling rules, (for the decentralized optimizers) topologies,
batch-size controllers (``batch_growths``) and iterate averages (``averagings``),
on one task with one budget. :func:`load_sweep` checks everything before any run
starts; a bad key or value raises :class:`SweepConfigError` naming the key and
its line in the file (or the flag). :func:`expand` turns the sweep into a
deterministic list of :class:`Cell` s, each a :class:`RunConfig` with a stable id
(a hash of the config) and a run directory ``DIR/runs/<cell-id>``.

Example file (every key is optional; see docs/experiments.md)::

    task = "mnist1d-cnn"
    batch_sizes = [64, 256, 1024, 4096, "full"]
    optimizers = ["sgd", "adamw"]
    seeds = [0, 1]
    epochs = 20

    [optimizer.sgd]          # run settings and hyperparameters of one optimizer
    scaling = "linear"
    warmup_epochs = 1
    momentum = 0.9
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from largebatch.optim.decentralized.topology import TOPOLOGIES
from largebatch.optim.registry import (
    OptimizerArguments,
    is_decentralized,
    list_optimizers,
    optimizer_arguments,
)
from largebatch.tasks.registry import option_defaults, validated_options
from largebatch.train.autowu import AUTOWU_DECAYS
from largebatch.train.averaging import KINDS as AVERAGING_KINDS
from largebatch.train.batch_growth import CONTROLLERS
from largebatch.train.config import RESUMABLE_CHANGES, RunConfig, Scaling, Schedule
from largebatch.train.plan import RunPlan
from largebatch.utils.errors import ConfigError, unknown_name_message
from largebatch.utils.values import check_like, is_number

KeyPath = tuple[str, ...]
FULL_BATCH = "full"
#: an item of the ``schedules``/``scalings`` axes: the setting the optimizer has without the axis
DEFAULT = "default"
#: the ``batch_growths`` and ``averagings`` entry for "none"
NONE = "none"


class SweepConfigError(ConfigError):
    """A sweep definition is invalid; the message names the key and where it was set."""


class _Invalid(ConfigError):
    """Raised by a value check with what was expected; turned into a SweepConfigError."""


class _InvalidItem(_Invalid):
    """A list item failed its check; the message already shows the item."""


# --- value checks: each returns the normalised value or raises _Invalid ----------------


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("expected a non-empty string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid("expected an integer >= 1")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid("expected an integer >= 0")
    return value


def _positive_number(value: Any) -> float:
    if not is_number(value) or not value > 0:
        raise _Invalid("expected a number > 0")
    return float(value)


def _non_negative_number(value: Any) -> float:
    if not is_number(value) or not value >= 0:
        raise _Invalid("expected a number >= 0")
    return float(value)


def _batch_size(value: Any) -> int | str:
    if value == FULL_BATCH:
        return value
    try:
        return _positive_int(value)
    except _Invalid:
        raise _Invalid(f'expected an integer >= 1 or "{FULL_BATCH}"') from None


def _one_of(choices: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Invalid(f"expected one of {', '.join(map(repr, choices))}")
        return value

    return check


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def check_list(value: Any) -> tuple:
        if not isinstance(value, list | tuple) or not value:
            raise _Invalid("expected a non-empty list")
        items = []
        for i, item in enumerate(value):
            try:
                items.append(check(item))
            except _Invalid as exc:
                raise _InvalidItem(f"item {i}: {exc}, got {item!r}") from None
        duplicates = sorted({str(x) for x in items if items.count(x) > 1})
        if duplicates:
            raise _Invalid(f"duplicate item(s) {', '.join(duplicates)}")
        return tuple(items)

    return check_list


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid("expected a table")
    return dict(value)


def _target(value: Any) -> tuple[str, float]:
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and is_number(value[1])
    ):
        raise _Invalid('expected [metric, value], e.g. ["accuracy", 0.9]')
    return (value[0], float(value[1]))


# --- the keys a sweep accepts ------------------------------------------------------------

#: Run settings that may be set for the whole sweep or per optimizer.
RUN_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "lr": _positive_number,
    "lrs": _list_of(_positive_number),
    "lr_factors": _list_of(_positive_number),
    "scaling": _one_of(typing.get_args(Scaling)),
    "warmup_steps": _non_negative_int,
    "warmup_epochs": _non_negative_number,
    "schedule": _one_of(typing.get_args(Schedule)),
    "autowu_min_lr": _positive_number,
    "autowu_max_lr": _positive_number,
    "autowu_max_warmup": _positive_number,
    "autowu_decay": _one_of(AUTOWU_DECAYS),
    "hessian_batch_size": _positive_int,
}
#: the run settings only AutoWU cells take
AUTOWU_SETTINGS = ("autowu_min_lr", "autowu_max_lr", "autowu_max_warmup", "autowu_decay")

#: Top-level keys of a sweep (besides RUN_SETTINGS and the ``[optimizer.NAME]`` tables).
SWEEP_KEYS: dict[str, Callable[[Any], Any]] = {
    "task": _string,
    "task_options": _table,
    "batch_sizes": _list_of(_batch_size),
    "optimizers": _list_of(_string),
    "topologies": _list_of(_one_of(tuple(TOPOLOGIES))),
    "seeds": _list_of(_non_negative_int),
    "epochs": _positive_number,
    "steps": _positive_int,
    "base_batch_size": _positive_int,
    "evals_per_run": _positive_int,
    "target": _target,
    "stop_at_target": _boolean,
    "checkpoint_every": _positive_int,
    "nproc": _positive_int,
    "accumulation_steps": _positive_int,
    "device": _string,
    "bf16": _boolean,
    "schedules": _list_of(_one_of((DEFAULT, *typing.get_args(Schedule)))),
    "scalings": _list_of(_one_of((DEFAULT, *typing.get_args(Scaling)))),
    "batch_growths": _list_of(_one_of((NONE, *sorted(CONTROLLERS)))),
    "batch_growth_theta": _positive_number,
    "batch_growth_options": _table,
    "max_batch_size": _positive_int,
    "averagings": _list_of(_one_of((NONE, *AVERAGING_KINDS))),
    "averaging_start": _non_negative_int,
    "averaging_decay": _non_negative_number,
    **RUN_SETTINGS,
}


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what :func:`expand` turns into cells.

    ``None`` run settings mean "the optimizer's registry recommendation";
    ``optimizer_settings[name]`` holds per-optimizer run settings (keys of
    :data:`RUN_SETTINGS`) and ``hyperparameters[name]`` its optimizer arguments.
    ``evals_per_run`` sets the evaluation interval of each cell relative to its
    length, so small- and large-batch runs get equally fine curves. ``topologies``
    multiplies the cells of the decentralized optimizers only (``None``: each
    optimizer's default topology); the others get one cell each. ``schedules``
    and ``scalings`` are grid axes over ``schedule`` and ``scaling``; their item
    ``"default"`` is what the optimizer gets without the axis (its section's
    setting, else the sweep's, else its recommendation). An AutoWU cell takes no
    learning rate, scaling rule or warm-up from the sweep, since it finds them.
    ``batch_growths`` and ``averagings`` are grid axes (``"none"`` for a plain
    run); the other batch-growth and averaging keys apply to every cell that
    uses them.
    """

    task: str = "mnist1d-cnn"
    task_options: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int | str, ...] = (64, 256, 1024, 4096, FULL_BATCH)
    optimizers: tuple[str, ...] = ("sgd", "adamw")
    topologies: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    epochs: float | None = 30.0
    steps: int | None = None
    base_batch_size: int = 64
    evals_per_run: int = 30
    target: tuple[str, float] | None = None
    stop_at_target: bool = False
    checkpoint_every: int | None = None
    nproc: int = 1
    accumulation_steps: int = 1
    device: str = "auto"
    bf16: bool = False
    lr: float | None = None
    lrs: tuple[float, ...] | None = None
    lr_factors: tuple[float, ...] | None = None
    scaling: str | None = None
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    schedule: str | None = None
    autowu_min_lr: float | None = None
    autowu_max_lr: float | None = None
    autowu_max_warmup: float | None = None
    autowu_decay: str | None = None
    schedules: tuple[str, ...] | None = None
    scalings: tuple[str, ...] | None = None
    hessian_batch_size: int | None = None
    batch_growths: tuple[str, ...] = (NONE,)
    batch_growth_theta: float | None = None
    batch_growth_options: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int | None = None
    averagings: tuple[str, ...] = (NONE,)
    averaging_start: int = 0
    averaging_decay: float = 0.999
    optimizer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The keys of an equivalent sweep file (what ``DIR/sweep.json`` holds)."""
        sections = ("optimizer_settings", "hyperparameters")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in sections}
        data["optimizer"] = {
            name: {**self.optimizer_settings.get(name, {}), **self.hyperparameters.get(name, {})}
            for name in {**self.optimizer_settings, **self.hyperparameters}
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """Inverse of :meth:`to_dict`, validated like a sweep file."""
        return load_sweep(overrides={k: v for k, v in data.items() if v is not None})

    def settings_for(self, optimizer: str) -> dict[str, Any]:
        """Run settings of ``optimizer``: its own section over the sweep-wide ones.

        A section's ``lrs`` or ``lr_factors`` replaces the sweep-wide grid; its
        ``lr`` replaces the sweep-wide ``lrs`` (sweep-wide ``lr_factors`` then
        multiply it).
        """
        merged = {key: getattr(self, key) for key in RUN_SETTINGS}
        section = self.optimizer_settings.get(optimizer, {})
        if section.keys() & {"lrs", "lr_factors"}:
            merged.update(lrs=None, lr_factors=None)
        if "lr" in section:
            merged["lrs"] = None
        merged.update(section)
        return merged


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a config, its stable id and its run directory; ``plan``, the
    config's plan when the sweep has made it (training then follows it, not a new one)."""

    cell_id: str
    config: RunConfig
    plan: RunPlan | None = field(default=None, compare=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)


# --- locating keys in a TOML file ----------------------------------------------------------

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")


def _split_dotted(key: str) -> KeyPath:
    return tuple(part.strip("\"'") for part in re.findall(_KEY_PART, key))


def toml_key_lines(text: str) -> dict[KeyPath, int]:
    """Line number (1-based) where each key path is first set, from the file's text.

    tomllib gives no positions, so this scans table headers and ``key =`` lines;
    keys inside an inline table resolve to the line of the table (see :func:`_where`).
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    in_multiline_string = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not in_multiline_string:
            header = _HEADER.match(line)
            if header:
                table = _split_dotted(header.group(1))
                lines.setdefault(table, number)
                continue
            assignment = _ASSIGNMENT.match(line)
            if assignment:
                lines.setdefault(table + _split_dotted(assignment.group(1)), number)
        if (line.count('"""') + line.count("'''")) % 2:
            in_multiline_string = not in_multiline_string
    return lines


Origins = dict[KeyPath, str]


def _where(origins: Origins, path: KeyPath) -> str:
    """Where ``path`` (or its closest enclosing key) was set: ``file:line`` or ``--flag``."""
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return "default"


def _fail(origins: Origins, path: KeyPath, problem: str) -> SweepConfigError:
    return SweepConfigError(f"{_where(origins, path)}: {'.'.join(path)}: {problem}")


# --- validation --------------------------------------------------------------------------


def _optimizer_arguments(name: str, base: Any = None) -> OptimizerArguments:
    """What optimizer ``name`` (with the wrapper's ``base``, if set) accepts; _Invalid if unknown."""
    if base is not None and not isinstance(base, str):
        raise _Invalid(f"base: expected an optimizer name, got {base!r}")
    try:
        return optimizer_arguments(name, base)
    except KeyError as exc:
        raise _Invalid(exc.args[0]) from None
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _check_value(origins: Origins, path: KeyPath, check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except _InvalidItem as exc:
        raise _fail(origins, path, str(exc)) from None
    except ConfigError as exc:
        raise _fail(origins, path, f"{exc}, got {value!r}") from None


def _check_optimizer_section(
    origins: Origins, name: str, section: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``[optimizer.NAME]`` into run settings and checked hyperparameters."""
    path = ("optimizer", name)
    section = _check_value(origins, path, _table, section)
    try:
        accepted = _optimizer_arguments(name, section.get("base"))
        arguments = accepted.defaults
    except _Invalid as exc:
        where = (*path, "base") if "base" in section else path
        raise _fail(origins, where, str(exc)) from None
    settings, hyperparameters = {}, {}
    for key, value in section.items():
        if key in RUN_SETTINGS:
            settings[key] = _check_value(origins, (*path, key), RUN_SETTINGS[key], value)
        elif key in arguments and value is None and key in accepted.optional:
            hyperparameters[key] = value
        elif key in arguments:
            checked = _check_value(
                origins, (*path, key), lambda v, d=arguments[key]: check_like(d, v), value
            )
            hyperparameters[key] = checked
        else:
            valid = sorted(set(RUN_SETTINGS) | set(arguments))
            raise _fail(origins, (*path, key), unknown_name_message("key", key, valid))
    return settings, hyperparameters


def load_sweep(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    origins: Origins | None = None,
    base: Mapping[str, Any] | None = None,
    base_origin: str = "default",
) -> SweepSpec:
    """Read and check a sweep: ``base`` values, then the TOML file, then ``overrides``.

    ``overrides`` are typically command-line flags; ``origins`` says where each
    override came from (key path -> e.g. ``"--batch-sizes"``), ``base_origin``
    where the base values did (e.g. a saved ``sweep.json``). Setting ``epochs``
    or ``steps`` in a later layer clears the other. Every key and value is
    checked here, including optimizer and task names, so no run starts on a
    sweep that would fail half-way.
    """
    data: dict[str, Any] = dict(base or {})
    where: Origins = {(key,): base_origin for key in data}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SweepConfigError(f"Cannot read sweep file {path}: {exc.strerror}") from None
        try:
            layer = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SweepConfigError(f"{path}: invalid TOML: {exc}") from None
        where.update({key: f"{path}:{line}" for key, line in toml_key_lines(text).items()})
        _apply_layer(data, layer)
    if overrides:
        where.update(origins or {})
        _apply_layer(data, overrides)
    return _build_spec(data, where)


def _apply_layer(data: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Overlay ``layer`` onto ``data``; the two budgets exclude each other."""
    if "epochs" in layer or "steps" in layer:
        data.pop("epochs", None)
        data.pop("steps", None)
    for key, value in layer.items():
        if key == "optimizer" and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value


def _build_spec(data: Mapping[str, Any], origins: Origins) -> SweepSpec:
    values: dict[str, Any] = {}
    optimizer_settings: dict[str, dict[str, Any]] = {}
    hyperparameters: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key == "optimizer":
            continue
        if key not in SWEEP_KEYS:
            valid = sorted({*SWEEP_KEYS, "optimizer"})
            raise _fail(origins, (key,), unknown_name_message("key", key, valid))
        values[key] = _check_value(origins, (key,), SWEEP_KEYS[key], value)

    sections = _check_value(origins, ("optimizer",), _table, data.get("optimizer", {}))
    for name, section in sections.items():
        optimizer_settings[name], hyperparameters[name] = _check_optimizer_section(
            origins, name, section
        )
        if not optimizer_settings[name]:
            del optimizer_settings[name]
        if not hyperparameters[name]:
            del hyperparameters[name]

    if "epochs" in values and "steps" in values:
        raise _fail(origins, ("steps",), "set either epochs or steps, not both")
    if "steps" in values:
        values.setdefault("epochs", None)

    spec = SweepSpec(
        **values, optimizer_settings=optimizer_settings, hyperparameters=hyperparameters
    )
    _check_names(spec, origins)
    return replace(spec, task_options=_checked_task_options(spec, origins))


def _check_names(spec: SweepSpec, origins: Origins) -> None:
    """Optimizer names exist; LR grids are well-defined."""
    known = [s.name for s in list_optimizers()]
    for i, name in enumerate(spec.optimizers):
        if name not in known:
            raise _fail(
                origins,
                ("optimizers",),
                f"item {i}: {unknown_name_message('optimizer', name, known)}",
            )
    layers = [((), {key: getattr(spec, key) for key in RUN_SETTINGS})]
    layers += [(("optimizer", name), section) for name, section in spec.optimizer_settings.items()]
    for prefix, settings in layers:
        for first, second in (("lr", "lrs"), ("lrs", "lr_factors")):
            if settings.get(first) is not None and settings.get(second) is not None:
                raise _fail(origins, (*prefix, second), f"set either {first} or {second}, not both")
    for name in spec.optimizers:
        settings = spec.settings_for(name)
        if (
            settings["lr_factors"] is not None
            and settings["lr"] is None
            and _default_lr(spec, name) is None
        ):
            raise _fail(origins, ("lr_factors",), f"optimizer {name!r} has no default lr; set lr")


def _checked_task_options(spec: SweepSpec, origins: Origins) -> dict[str, Any]:
    """The task exists; its options, converted by the tasks' own check, each failure named."""
    try:
        option_defaults(spec.task)
    except (KeyError, ImportError, ValueError, TypeError) as exc:
        raise _fail(origins, ("task",), str(exc.args[0])) from None
    checked = {}
    for key, value in spec.task_options.items():
        try:
            checked.update(validated_options(spec.task, {key: value}))
        except ConfigError as exc:
            raise _fail(origins, ("task_options", key), str(exc)) from None
    return checked


# --- expansion into cells -----------------------------------------------------------------


def resolve_batch_sizes(spec: SweepSpec, train_size: int) -> tuple[int, ...]:
    """Batch sizes with ``"full"`` replaced by the training-set size."""
    return tuple(train_size if b == FULL_BATCH else b for b in spec.batch_sizes)


def _default_lr(spec: SweepSpec, optimizer: str) -> float | None:
    """The learning rate ``optimizer`` uses when none is given (with the sweep's ``base=``)."""
    base = spec.hyperparameters.get(optimizer, {}).get("base")
    return optimizer_arguments(optimizer, base).lr


def _learning_rates(spec: SweepSpec, optimizer: str) -> tuple[float | None, ...]:
    """The base learning rates of ``optimizer``'s cells (``None``: registry default)."""
    settings = spec.settings_for(optimizer)
    if settings["lrs"] is not None:
        return settings["lrs"]
    if settings["lr_factors"] is not None:
        base_lr = settings["lr"] if settings["lr"] is not None else _default_lr(spec, optimizer)
        return tuple(base_lr * factor for factor in settings["lr_factors"])
    return (settings["lr"],)


#: RunConfig fields added after sweeps were first written, with their defaults
LATER_FIELDS: dict[str, Any] = {
    "topology": None,
    "warmup_start": 0.0,
    "decay_floor": 0.0,
    "autowu_min_lr": 1e-5,
    "autowu_max_lr": 1.0,
    "autowu_max_warmup": 0.5,
    "autowu_decay": "cosine",
    "hessian_batch_size": None,
    "batch_growth": None,
    "batch_growth_theta": None,
    "batch_growth_options": {},
    "max_batch_size": None,
    "averaging": None,
    "averaging_start": 0,
    "averaging_decay": 0.999,
}
#: the schedule and scaling settings a cell name shows (they find the rate themselves)
ADAPTIVE = ("autowu", "adascale")


def cell_id(config: RunConfig) -> str:
    """Stable, readable id: ``<name>-<hash>`` (the name is :func:`cell_name`'s).

    The hash covers every field of the config except those a resumed run may
    change (where it lives, checkpoint interval, progress bar, ...), so the same
    run always gets the same id. A field of :data:`LATER_FIELDS` at its default is
    left out too, so the cells of sweeps made before it existed keep their ids.
    """
    data = {
        k: v
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_CHANGES and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cell_name(config)}-{digest}"


def cell_name(config: RunConfig) -> str:
    """The readable part of a cell id: ``<optimizer>[-<topology>]-b<batch>-s<seed>[-lr<lr>]``
    then ``-autowu``, ``-adascale``, ``-<batch growth>``, ``-<average>`` where they apply."""
    adaptive = [name for name in (config.schedule, config.scaling) if name in ADAPTIVE]
    extras = (*adaptive, config.batch_growth or NONE, config.averaging or NONE)
    return _name(
        config.optimizer, config.batch_size, config.seed, config.lr, config.topology, extras
    )


def _name(
    optimizer: str,
    batch_size: int,
    seed: int,
    lr: float | None,
    topology: str | None = None,
    extras: tuple[str, ...] = (),
) -> str:
    lr_part = f"-lr{lr:g}" if lr is not None else ""
    tail = "".join(f"-{part}" for part in extras if part != NONE)
    return f"{series_name(optimizer, topology)}-b{batch_size}-s{seed}{lr_part}{tail}"


def series_name(optimizer: str, topology: str | None) -> str:
    """A series of runs: the optimizer, and the graph a decentralized one gossips over
    (``dmsgd-ring``); the start of its cells' names, and its label in reports."""
    return optimizer if topology is None else f"{optimizer}-{topology}"


def adaptive_method(config: Mapping[str, Any]) -> str | None:
    """``"autowu"`` or ``"adascale"`` for a run config (dict) using one of them, else ``None``:
    such a run sets its own learning rate, so reports keep it a series of its own."""
    if config.get("schedule") == "autowu":
        return "autowu"
    return "adascale" if config.get("scaling") == "adascale" else None


def _optimizers_and_topologies(spec: SweepSpec) -> list[tuple[str, str | None]]:
    """``(optimizer, topology)`` of the cells: every topology for a decentralized optimizer."""
    pairs = []
    for optimizer in spec.optimizers:
        base = spec.hyperparameters.get(optimizer, {}).get("base")
        decentralized = spec.topologies is not None and is_decentralized(optimizer, base)
        pairs += [(optimizer, t) for t in (spec.topologies if decentralized else (None,))]
    return pairs


def expand(
    spec: SweepSpec,
    sweep_dir: str | Path,
    train_size: int,
    eval_every: Callable[[RunConfig], int],
) -> list[Cell]:
    """The sweep's cells, in a fixed order: seed, batch size, optimizer, topology, variant,
    batch growth, averaging.

    ``train_size`` resolves ``"full"``; ``eval_every(config)`` gives a cell's
    evaluation interval, which is also its checkpoint interval unless the spec
    sets ``checkpoint_every``.
    """
    batch_sizes = resolve_batch_sizes(spec, train_size)
    runs_dir = Path(sweep_dir) / "runs"
    cells = []
    axes = itertools.product(spec.seeds, batch_sizes, _optimizers_and_topologies(spec))
    for seed, batch_size, (optimizer, topology) in axes:
        hessian_batch_size = spec.settings_for(optimizer)["hessian_batch_size"]
        extras = itertools.product(_variants(spec, optimizer), spec.batch_growths, spec.averagings)
        for (settings, lr), growth, averaging in extras:
            try:
                config = RunConfig(
                    task=spec.task,
                    task_options=dict(spec.task_options),
                    optimizer=optimizer,
                    optimizer_options=dict(spec.hyperparameters.get(optimizer, {})),
                    lr=lr,
                    base_batch_size=spec.base_batch_size,
                    batch_size=batch_size,
                    accumulation_steps=spec.accumulation_steps,
                    **settings,
                    epochs=spec.epochs,
                    steps=spec.steps,
                    target=spec.target,
                    stop_at_target=spec.stop_at_target,
                    seed=seed,
                    device=spec.device,
                    bf16=spec.bf16,
                    nproc=spec.nproc,
                    topology=topology,
                    hessian_batch_size=hessian_batch_size,
                    **_growth_and_averaging(spec, growth, averaging),
                )
            except ConfigError as exc:
                name = _name(optimizer, batch_size, seed, lr, topology, (growth, averaging))
                raise SweepConfigError(f"cell {name}: {exc}") from None
            every = eval_every(config)
            config = replace(
                config, eval_every=every, checkpoint_every=spec.checkpoint_every or every
            )
            identifier = cell_id(config)
            cells.append(Cell(identifier, replace(config, out_dir=str(runs_dir / identifier))))
    return cells


def _growth_and_averaging(spec: SweepSpec, growth: str, averaging: str) -> dict[str, Any]:
    """The batch-growth and averaging fields of a cell at ``growth``/``averaging`` on their
    axes: the sweep's batch-growth settings go to growing cells only."""
    growing = growth != NONE
    return {
        "batch_growth": growth if growing else None,
        "batch_growth_theta": spec.batch_growth_theta if growing else None,
        "batch_growth_options": dict(spec.batch_growth_options) if growing else {},
        "max_batch_size": spec.max_batch_size if growing else None,
        "averaging": averaging if averaging != NONE else None,
        "averaging_start": spec.averaging_start,
        "averaging_decay": spec.averaging_decay,
    }


def _variants(spec: SweepSpec, optimizer: str) -> list[tuple[dict[str, Any], float | None]]:
    """``optimizer``'s cells on one seed and batch size: (schedule, scaling, warm-up), rate.

    One set of settings per point of the ``schedules`` and ``scalings`` axes,
    each with every learning rate of :func:`_learning_rates`; AutoWU takes no
    rate, scaling or warm-up from the sweep (one cell, whatever the scaling axis),
    and the others no ``autowu_*`` setting.
    """
    settings = spec.settings_for(optimizer)

    def axis(setting: str, values: tuple[str, ...] | None) -> tuple[str | None, ...]:
        own = settings[setting]
        return (own,) if values is None else tuple(own if v == DEFAULT else v for v in values)

    cells: list[tuple[dict[str, Any], float | None]] = []
    for schedule in axis("schedule", spec.schedules):
        if schedule == "autowu":
            autowu = {key: settings[key] for key in AUTOWU_SETTINGS if settings[key] is not None}
            cells.append(({"schedule": schedule, **autowu}, None))
            continue
        for scaling in axis("scaling", spec.scalings):
            fixed = {
                "schedule": schedule or RunConfig.schedule,
                "scaling": scaling,
                "warmup_steps": settings["warmup_steps"],
                "warmup_epochs": settings["warmup_epochs"],
            }
            cells.extend((fixed, lr) for lr in _learning_rates(spec, optimizer))
    return cells
