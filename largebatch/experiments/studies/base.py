"""What a study is, and how one runs: sweep files, a protocol per file, a report section.

A :class:`Study` is one or more :class:`Part` s, each a sweep file shipped with
the package (``presets/*.toml``, a plain sweep file: ``largebatch sweep --file``
runs a copy of it as an ordinary grid) and a :class:`Protocol` saying which of
its cells to run given the results so far (every cell; or per-cell learning-rate
tuning, :class:`Tuned`). ``run_study`` runs every part into ``DIR/<part>/`` (a
complete sweep directory: ``largebatch results`` and ``largebatch report`` work
on it), then the study's post-processing (e.g. sharpness), then writes
``DIR/report.html`` and ``DIR/report.md``: the study's own sections, with the
paper's numbers next to ours, and links to each part's full sweep report.

Studies register themselves with :func:`register` (see ``studies/__init__.py``
for the built-in ones); ``largebatch study --list`` shows the registry.
"""

from __future__ import annotations

import json
import resource
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from largebatch.experiments.analysis import selection_score
from largebatch.experiments.report import ReportContext, Section, write_report
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.scheduler import Plan, run_cells
from largebatch.experiments.sweep import SWEEP_FILE, prepare
from largebatch.experiments.sweep_config import Cell, SweepConfigError, SweepSpec, load_sweep
from largebatch.experiments.tuning import TuningState, settle
from largebatch.optim.registry import get_spec, optimizer_arguments
from largebatch.tasks import get_task
from largebatch.train.schedules import scale_lr
from largebatch.utils.atomic import write_json_atomic
from largebatch.utils.errors import ConfigError, UnknownNameError, unknown_name_message

PRESETS = "presets"
MARKER = "study.json"

Row = dict[str, Any]
#: a tuned series at one batch size: (optimizer, topology or ``None``, batch size)
Group = tuple[str, str | None, int]


class StudyError(ConfigError):
    """A study cannot run as asked: a directory holding another study, a part's bad sweep file."""


def preset_path(file: str) -> Path:
    """A shipped sweep file, ``largebatch/experiments/studies/presets/<file>`` (or ``file``
    itself if it is an absolute path: a study of one's own)."""
    path = Path(file)
    if not path.is_absolute():
        path = Path(str(resources.files(__package__).joinpath(PRESETS, file)))
    if not path.is_file():
        raise StudyError(f"No sweep file {file!r} in {path.parent}")
    return path


# --- cells --------------------------------------------------------------------------------


class CellFactory:
    """The cells of one sweep, built one at a time for protocols that go beyond its grid.

    :meth:`cell` gives the cell of one optimizer, batch size, seed and base
    learning rate (any value, not only the grid's), optionally with other sweep
    keys replaced (a per-batch budget); each is checked as ``largebatch sweep``
    checks its cells, and has the id the same run has in the plain sweep.
    """

    def __init__(self, spec: SweepSpec, directory: str | Path) -> None:
        self.spec = spec
        self.directory = Path(directory)
        self.grid = list(prepare(spec, self.directory).cells)  # checks every grid cell up front
        self._cells: dict[tuple, Cell] = {}

    @cached_property
    def train_size(self) -> int:
        return len(get_task(self.spec.task, **self.spec.task_options).train)

    def groups(self) -> dict[Group, tuple[float | None, ...]]:
        """(optimizer, topology, batch size) -> the base learning rates of the grid, in grid
        order (``topology`` is ``None`` but for a decentralized optimizer on a ``topologies``
        axis: each of its topologies is a series of its own)."""
        groups: dict[Group, list[float | None]] = {}
        for cell in self.grid:
            config = cell.config
            lrs = groups.setdefault((config.optimizer, config.topology, config.batch_size), [])
            if config.lr not in lrs:
                lrs.append(config.lr)
        return {key: tuple(lrs) for key, lrs in groups.items()}

    def cell(
        self,
        optimizer: str,
        batch_size: int,
        seed: int,
        lr: float | None,
        topology: str | None = None,
        **keys: Any,
    ) -> Cell:
        """The cell of ``optimizer`` (on ``topology``, one of the sweep's ``topologies``) at
        ``batch_size``, ``seed`` and base learning rate ``lr``."""
        if topology is not None:
            keys["topologies"] = (topology,)
        key = (optimizer, batch_size, seed, lr, json.dumps(keys, sort_keys=True))
        if key not in self._cells:
            section = {
                k: v
                for k, v in self.spec.optimizer_settings.get(optimizer, {}).items()
                if k not in ("lr", "lrs", "lr_factors")
            }
            if lr is not None:
                section["lrs"] = (lr,)
            single = replace(
                self.spec,
                batch_sizes=(batch_size,), optimizers=(optimizer,), seeds=(seed,),
                lr=None, lrs=None, lr_factors=None,
                optimizer_settings={**self.spec.optimizer_settings, optimizer: section},
                **keys,
            )  # fmt: skip
            (self._cells[key],) = prepare(single, self.directory).cells
        return self._cells[key]

    def steps_budget(self, batch_size: int, min_steps: int | None) -> dict[str, Any]:
        """Sweep keys giving ``batch_size`` at least ``min_steps`` steps (``{}`` if it has them)."""
        if min_steps is None or self.spec.epochs is None:
            return {}
        steps_per_epoch = self.train_size // batch_size
        if round(self.spec.epochs * steps_per_epoch) >= min_steps:
            return {}
        return {"epochs": None, "steps": min_steps}


# --- protocols ----------------------------------------------------------------------------


class Protocol(typing.Protocol):
    """Which cells of a sweep to run, given the rows recorded so far (``cell_id -> row``)."""

    def cells(self, factory: CellFactory, rows: Mapping[str, Row]) -> list[Cell]: ...


@dataclass(frozen=True)
class Grid:
    """Every cell of the sweep file, as ``largebatch sweep`` runs it."""

    def cells(self, factory: CellFactory, rows: Mapping[str, Row]) -> list[Cell]:
        return factory.grid


#: the adaptive schedules a study can run beside its tuned cells, and the sweep axis each sets
ADAPTIVE_AXES = {"autowu": {"schedules": ("autowu",)}, "adascale": {"scalings": ("adascale",)}}


@dataclass(frozen=True)
class Adaptive:
    """Adaptive schedules beside per-cell tuning: one run per optimizer, batch size and seed.

    They are not tuned over the learning-rate grid, since each sets its own rate:
    AutoWU (``schedule="autowu"``) finds its warm-up and peak during the run, in
    the range the sweep file's ``autowu_*`` settings give; AdaScale
    (``scaling="adascale"``) takes the rate tuned at the sweep's smallest batch
    size B0 (the rate that cell ran at, with B0 as its base batch size, so it
    waits for that tuning), keeps B0's epoch budget in scale-invariant steps and
    scales the rate by the gain it measures. At B0 itself AdaScale would be the
    tuned run, so it does not run there. AdaScale measures the gradient variance
    across ``accumulation_steps`` micro-batches, so its cells get at least 2 (the
    update is the same). ``optimizers``: those that get the adaptive cells (the
    sweep's, in its order; ``None``: all).
    """

    methods: tuple[str, ...] = ("autowu", "adascale")
    optimizers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ADAPTIVE_AXES]
        if unknown or not self.methods:
            raise StudyError(
                f"Invalid adaptive methods: {list(self.methods)} "
                f"(choose one or more of {', '.join(ADAPTIVE_AXES)})"
            )

    def cells(
        self,
        factory: CellFactory,
        states: Mapping[Group, TuningState | None],
        budget: Callable[[int], dict[str, Any]],
    ) -> list[Cell]:
        """The adaptive cells known so far; ``budget(batch_size)``: a tuned cell's budget keys."""
        spec = factory.spec
        smallest = min(batch for *_, batch in states)
        wanted = []
        for optimizer, topology, batch_size in states:
            if self.optimizers is not None and optimizer not in self.optimizers:
                continue
            for method in self.methods:
                if method == "autowu":
                    keys = {**ADAPTIVE_AXES[method], **budget(batch_size)}
                    lr = None
                else:
                    base = self.base_rate(factory, optimizer, topology, smallest, states, budget)
                    if batch_size == smallest or base is None:
                        continue
                    lr = base
                    keys = {
                        **ADAPTIVE_AXES[method],
                        "base_batch_size": smallest,
                        "accumulation_steps": max(2, spec.accumulation_steps),
                    }
                wanted += [
                    factory.cell(optimizer, batch_size, s, lr, topology, **keys) for s in spec.seeds
                ]
        return wanted

    @staticmethod
    def base_rate(
        factory: CellFactory,
        optimizer: str,
        topology: str | None,
        base_batch: int,
        states: Mapping[Group, TuningState | None],
        budget: Callable[[int], dict[str, Any]],
    ) -> float | None:
        """The learning rate the tuned cell of ``optimizer`` ran at ``base_batch`` with (its
        base rate scaled by its rule), ``None`` while that tuning is unsettled."""
        state = states[optimizer, topology, base_batch]
        if state is None:
            (lr,) = factory.groups()[optimizer, topology, base_batch]
        elif state.settled:
            lr = state.chosen
        else:
            return None
        seed = factory.spec.seeds[0]
        config = factory.cell(
            optimizer, base_batch, seed, lr, topology, **budget(base_batch)
        ).config
        if lr is None:
            lr = optimizer_arguments(optimizer, config.optimizer_options.get("base")).lr
        rule = config.scaling if config.scaling is not None else get_spec(optimizer).scaling_rule
        return scale_lr(lr, base_batch, config.base_batch_size, rule)


@dataclass(frozen=True)
class Tuned:
    """Per-cell learning-rate tuning (:mod:`largebatch.experiments.tuning`), then seeds.

    The sweep file's learning rates (``lrs`` or ``lr_factors``, per optimizer or
    sweep-wide) are each cell's initial grid and its first seed the tuning seed;
    the other seeds run at the chosen value, at every batch size from
    ``seeds_from`` on (all if ``None``). ``min_steps`` gives a batch size whose
    epoch budget is shorter at least that many steps, so that large batches are
    not stopped before they can fit the data (then the budget is in steps).
    ``adaptive``: AutoWU and AdaScale cells beside the tuned ones (:class:`Adaptive`).
    """

    max_extensions: int = 3
    seeds_from: int | None = None
    min_steps: int | None = None
    adaptive: Adaptive | None = None

    def states(
        self, factory: CellFactory, rows: Mapping[str, Row]
    ) -> dict[Group, TuningState | None]:
        """(optimizer, topology, batch size) -> the tuning replayed from ``rows`` (``None``:
        one lr, no tuning)."""
        states = {}
        seed = factory.spec.seeds[0]
        for (optimizer, topology, batch_size), lrs in factory.groups().items():
            if len(lrs) < 2:
                states[optimizer, topology, batch_size] = None
                continue
            budget = factory.steps_budget(batch_size, self.min_steps)

            def cell(lr: float | None) -> Cell:
                return factory.cell(optimizer, batch_size, seed, lr, topology, **budget)  # noqa: B023

            scores: dict[float, Any] = {}
            while True:
                state = settle(lrs, scores, self.max_extensions)
                found = {
                    lr: selection_score([rows[cell(lr).cell_id]])[0]
                    for lr in state.missing
                    if cell(lr).cell_id in rows
                }
                if not found:
                    break
                scores.update(found)
            states[optimizer, topology, batch_size] = state
        return states

    def budget(self, factory: CellFactory) -> Callable[[int], dict[str, Any]]:
        """batch size -> the budget keys of its tuned cells."""
        return lambda batch_size: factory.steps_budget(batch_size, self.min_steps)

    def cells(self, factory: CellFactory, rows: Mapping[str, Row]) -> list[Cell]:
        states = self.states(factory, rows)
        return self.tuned_cells(factory, states) + self.adaptive_cells(factory, states)

    def adaptive_cells(
        self, factory: CellFactory, states: Mapping[Group, TuningState | None]
    ) -> list[Cell]:
        if self.adaptive is None:
            return []
        return self.adaptive.cells(factory, states, self.budget(factory))

    def tuned_cells(
        self, factory: CellFactory, states: Mapping[Group, TuningState | None]
    ) -> list[Cell]:
        wanted = []
        seeds = factory.spec.seeds
        for (optimizer, topology, batch_size), state in states.items():
            budget = factory.steps_budget(batch_size, self.min_steps)

            def cell(seed: int, lr: float | None) -> Cell:
                return factory.cell(optimizer, batch_size, seed, lr, topology, **budget)  # noqa: B023

            if state is None:
                (lr,) = factory.groups()[optimizer, topology, batch_size]
                wanted += [cell(seed, lr) for seed in seeds]
                continue
            wanted += [cell(seeds[0], lr) for lr in state.grid]
            if state.settled and (self.seeds_from is None or batch_size >= self.seeds_from):
                wanted += [cell(seed, state.chosen) for seed in seeds[1:]]
        return wanted


# --- studies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One sweep of a study: a shipped sweep file, its protocol, its ``--quick`` settings.

    ``quick`` holds sweep keys that replace the file's for ``--quick`` (a few
    small runs that exercise everything: the tests use it), ``quick_protocol``
    the protocol then (default: the same). ``report``: write the part's own sweep
    report too.
    """

    name: str
    file: str
    protocol: Protocol = field(default_factory=Grid)
    quick: Mapping[str, Any] = field(default_factory=dict)
    quick_protocol: Protocol | None = None
    report: bool = True

    def protocol_for(self, quick: bool) -> Protocol:
        return self.quick_protocol if quick and self.quick_protocol is not None else self.protocol

    def spec(self, quick: bool = False) -> SweepSpec:
        """The checked sweep (with the ``--quick`` keys if ``quick``)."""
        overrides = dict(self.quick) if quick else {}
        origins = {(key,): f"{self.name} --quick" for key in overrides}
        return load_sweep(preset_path(self.file), overrides=overrides, origins=origins)


@dataclass
class PartResults:
    """A part's sweep directory, factory and recorded rows, as the study's sections read them."""

    part: Part
    directory: Path
    factory: CellFactory
    protocol: Protocol
    rows: list[Row]

    @cached_property
    def by_id(self) -> dict[str, Row]:
        return {row["cell_id"]: row for row in self.rows}

    @cached_property
    def states(self) -> dict[Group, TuningState | None]:
        """Each tuned group's tuning state (empty for a protocol that does not tune)."""
        if not isinstance(self.protocol, Tuned):
            return {}
        return self.protocol.states(self.factory, self.by_id)

    @cached_property
    def adaptive_ids(self) -> set[str]:
        if not isinstance(self.protocol, Tuned):
            return set()
        return {c.cell_id for c in self.protocol.adaptive_cells(self.factory, self.states)}

    @cached_property
    def wanted(self) -> list[Row]:
        """The rows of the cells the protocol wants (not any other run of the directory),
        but for the adaptive cells (:attr:`adaptive`)."""
        ids = {cell.cell_id for cell in self.protocol.cells(self.factory, self.by_id)}
        return [
            r for r in self.rows if r["cell_id"] in ids and r["cell_id"] not in self.adaptive_ids
        ]

    @cached_property
    def adaptive(self) -> list[Row]:
        """The rows of the protocol's adaptive cells (AutoWU, AdaScale: :class:`Adaptive`)."""
        return [row for row in self.rows if row["cell_id"] in self.adaptive_ids]

    @cached_property
    def report(self) -> ReportContext:
        """Points, series and curves of the wanted rows (learning rate chosen on validation)."""
        return ReportContext(self.directory, self.wanted)


@dataclass
class StudyContext:
    """What a study's sections and post-processing read."""

    study: Study
    directory: Path
    quick: bool
    parts: dict[str, PartResults]


@dataclass(frozen=True)
class Study:
    """A registered study.

    Attributes:
        name: as typed after ``largebatch study``.
        title: one line for ``--list`` and the report's title.
        question: what the study answers (the report's first paragraph).
        parts: its sweeps.
        sections: builds the study's report sections (paper's numbers next to ours).
        minutes: expected wall time in minutes on 2 idle CPU cores, full and ``--quick``
            (measured as CPU time / 2: see docs/RESULTS.md).
        finish: post-processing after every run is recorded (e.g. sharpness), called
            as ``finish(context, jobs, progress)``, or ``None``.
        summary: the text printed at the end of ``largebatch study`` (default: the
            first table of the first section).
    """

    name: str
    title: str
    question: str
    parts: tuple[Part, ...]
    sections: Callable[[StudyContext], list[Section]]
    minutes: tuple[float, float]
    finish: Callable[[StudyContext, int, bool], None] | None = None
    summary: Callable[[StudyContext], str] | None = None


_REGISTRY: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add ``study`` to the registry (its name must be new and its parts' names distinct)."""
    if study.name in _REGISTRY:
        raise StudyError(f"Invalid study: {study.name!r} is already registered")
    names = [part.name for part in study.parts]
    if len(set(names)) != len(names):
        raise StudyError(f"Invalid study {study.name!r}: parts with the same name: {names}")
    _REGISTRY[study.name] = study
    return study


def list_studies() -> list[Study]:
    return list(_REGISTRY.values())


def get_study(name: str) -> Study:
    """The registered study ``name``; :class:`UnknownNameError` naming the closest otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(unknown_name_message("study", name, _REGISTRY)) from None


# --- running ------------------------------------------------------------------------------


def _check_marker(directory: Path, study: Study, quick: bool) -> dict[str, Any]:
    """Refuse a directory that holds another study, or the other variant of this one.

    Returns the directory's ``study.json`` (new if there is none): the study, whether
    ``--quick``, and ``cpu_seconds``, the CPU time the study has taken so far (this
    process and its workers: runs, post-processing, reports; summed over every start
    that finished).
    """
    path = directory / MARKER
    if not path.exists():
        return {"study": study.name, "quick": quick, "cpu_seconds": 0.0}
    saved = json.loads(path.read_text())
    if saved.get("study") != study.name or saved.get("quick") != quick:
        variant = "the --quick variant of " if saved.get("quick") else ""
        raise StudyError(
            f"{directory} holds {variant}study {saved.get('study')!r}; "
            f"choose another directory for {'--quick ' if quick else ''}{study.name!r}"
        )
    return saved


def _cost(cell: Cell, train_size: int) -> float:
    """A rough relative cost of a cell, to start the longest first: examples seen, plus
    a per-step overhead worth about 200 examples of a small model."""
    config = cell.config
    steps_per_epoch = max(1, train_size // config.batch_size)
    steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    return steps * (config.batch_size + 200)


def results(study: Study, directory: Path, quick: bool) -> StudyContext:
    """The study's context: every part's factory and recorded rows."""
    parts = {}
    for part in study.parts:
        part_dir = directory / part.name
        try:
            factory = CellFactory(part.spec(quick), part_dir)
        except SweepConfigError as error:
            raise StudyError(f"study {study.name!r}, part {part.name!r}: {error}") from None
        rows = ResultsStore(part_dir).rows() if (part_dir / "results.sqlite").exists() else []
        parts[part.name] = PartResults(part, part_dir, factory, part.protocol_for(quick), rows)
    return StudyContext(study, directory, quick, parts)


def run_study(
    study: Study,
    directory: str | Path,
    *,
    quick: bool = False,
    jobs: int = 1,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Run (or continue) ``study`` in ``directory``; write its report; return the report paths.

    Everything is checked before any run starts; re-running continues where a
    killed study stopped.
    """
    directory = Path(directory)
    started = _cpu_seconds()
    marker = _check_marker(directory, study, quick)
    context = results(study, directory, quick)  # checks every part's sweep
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / MARKER, marker)
    for part in context.parts.values():
        part.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(part.directory / SWEEP_FILE, part.factory.spec.to_dict())

    def plan() -> Plan:
        current, costs = Plan(), {}
        for part in context.parts.values():
            rows = {r["cell_id"]: r for r in ResultsStore(part.directory).rows()}
            cells = part.protocol.cells(part.factory, rows)
            current.total += len(cells)
            pending = [c for c in cells if c.cell_id not in rows]
            current.pending += [(c, part.directory) for c in pending]
            costs.update({c.cell_id: _cost(c, part.factory.train_size) for c in pending})
        current.pending.sort(key=lambda item: -costs[item[0].cell_id])
        return current

    run_cells(plan, jobs=jobs, progress=progress, desc=study.name)
    context = results(study, directory, quick)
    if study.finish is not None:
        study.finish(context, jobs, progress)
        context = results(study, directory, quick)
    paths = write_study_report(context)
    marker["cpu_seconds"] = marker.get("cpu_seconds", 0.0) + _cpu_seconds() - started
    write_json_atomic(directory / MARKER, marker)
    return paths


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers), in seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_study_report(context: StudyContext) -> tuple[Path, Path]:
    """``DIR/report.{html,md}``: the study's sections, then links to each part's report
    (written here, except with ``--quick``)."""
    from largebatch.experiments.report import report

    study = context.study
    links = []
    for part in context.parts.values():
        if part.part.report and part.rows:
            if not context.quick:  # a smoke test skips them: `largebatch report` writes them
                report(part.directory)
            links.append(f"[{part.part.name}]({part.part.name}/report.html)")
    sections = study.sections(context)
    if links:
        text = (
            "Every part of the study is a sweep directory with its own report "
            "(accuracy, generalization gap, steps to target, loss curves, every run): "
        )
        if context.quick:
            text += "`largebatch report DIR/<part>` writes it for " + ", ".join(
                f"`{part.part.name}`" for part in context.parts.values() if part.part.report
            )
        else:
            text += ", ".join(links)
        sections.append(Section("Full sweep reports", text + "."))
    variant = " (--quick: a smoke test, not a result)" if context.quick else ""
    return write_report(
        context.directory, f"Study {study.name}: {study.title}{variant}", sections, study.question
    )
