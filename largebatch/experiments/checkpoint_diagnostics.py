"""The standard diagnostics of a saved run, as ``largebatch diagnose`` and ``sweep --diagnose`` compute them.

:func:`load_run` finds a run's checkpoint and ``config.json``, rebuilds its task
and model and loads the weights; :func:`run_diagnostics` measures
epsilon-sharpness (full space and a random subspace), the top Hessian
eigenvalues, the Hessian trace and, optionally, the spectral density on a fixed,
seeded subset of the training data; :func:`interpolate_runs` evaluates the line
between two runs' weights on training and test data. :func:`summary_metrics`
turns a diagnostics record into the flat numbers a results database stores.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from largebatch.diagnostics.evaluation import evaluate, fixed_subset
from largebatch.diagnostics.hessian import hutchinson_trace, spectral_density, top_eigenvalues
from largebatch.diagnostics.hvp import HessianOperator
from largebatch.diagnostics.interpolation import InterpolationResult, interpolate_checkpoints
from largebatch.diagnostics.sharpness import epsilon_sharpness
from largebatch.tasks import Task, get_task
from largebatch.train.checkpoint import CheckpointError, load_checkpoint, load_latest
from largebatch.train.config import RunConfig
from largebatch.train.distributed import pick_device
from largebatch.utils.errors import ConfigError

#: where a run's diagnostics record is saved, in its run directory
DIAGNOSTICS_FILE = "diagnostics.json"
DIAGNOSTICS = ("sharpness", "eigenvalues", "trace", "density")
DEFAULT_DIAGNOSTICS = ("sharpness", "eigenvalues", "trace")
#: the epsilon whose sharpness is reported without a suffix (Keskar et al.'s main value)
MAIN_EPSILON = 1e-3


@dataclass(frozen=True)
class DiagnosticsSettings:
    """What to measure and on which data; every field is checked on construction.

    Attributes:
        diagnostics: a subset of :data:`DIAGNOSTICS`.
        num_examples: size of the seeded training subset (at most the training set).
        batch_size: examples per forward pass.
        seed: seeds the subset, the random start points, subspace and probe vectors.
        epsilons: box sizes of the sharpness (Keskar et al.: 1e-3 and 5e-4).
        subspace_dim: p of the random-subspace sharpness (``None``: full space only).
        max_iter: L-BFGS-B iterations of the sharpness.
        k: number of top Hessian eigenvalues.
        tol: relative residual at which the eigenvalues count as converged.
        max_products: Hessian-vector products allowed for the eigenvalues.
        num_probes: Hutchinson probes for the trace.
        density_steps: Lanczos steps of the spectral density (one run).
        train_mode: evaluate in train mode (batch statistics, dropout), else eval mode.
    """

    diagnostics: tuple[str, ...] = DEFAULT_DIAGNOSTICS
    num_examples: int = 2048
    batch_size: int = 1024
    seed: int = 0
    epsilons: tuple[float, ...] = (1e-3, 5e-4)
    subspace_dim: int | None = 100
    max_iter: int = 10
    k: int = 5
    tol: float = 1e-3
    max_products: int = 100
    num_probes: int = 50
    density_steps: int = 50
    train_mode: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.diagnostics if name not in DIAGNOSTICS]
        if unknown:
            raise ConfigError(
                f"Invalid diagnostics: {', '.join(map(repr, unknown))} "
                f"(choose from {', '.join(DIAGNOSTICS)})"
            )
        positive = ("num_examples", "batch_size", "max_iter", "k", "max_products", "density_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Invalid {name}: {value!r} (must be a positive integer)")
        if not isinstance(self.num_probes, int) or self.num_probes < 2:
            raise ConfigError(f"Invalid num_probes: {self.num_probes!r} (need at least 2)")
        if self.subspace_dim is not None and self.subspace_dim < 1:
            raise ConfigError(f"Invalid subspace_dim: {self.subspace_dim!r} (positive, or None)")
        if "sharpness" in self.diagnostics and not self.epsilons:
            raise ConfigError("Invalid epsilons: none given")
        for epsilon in self.epsilons:
            if not epsilon > 0:
                raise ConfigError(f"Invalid epsilon: {epsilon!r} (must be > 0)")
        if not 0 < self.tol < 1:
            raise ConfigError(f"Invalid tol: {self.tol!r} (must be in (0, 1))")
        if self.max_products < self.k:
            raise ConfigError(
                f"Invalid max_products: {self.max_products} (must be >= k = {self.k})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiagnosticsSettings:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("diagnostics", "epsilons"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class SavedRun:
    """A run's weights loaded into a freshly built model of its task."""

    run_dir: Path
    checkpoint: Path
    step: int
    config: RunConfig
    task: Task
    model: nn.Module


def _checkpoint_and_run_dir(path: Path) -> tuple[Path | None, Path]:
    """``(checkpoint file or None for the newest, run directory)`` for a user-given path."""
    if not path.exists():
        raise ConfigError(f"No such checkpoint or run directory: {path}")
    if path.is_file():
        parent = path.parent
        return path, parent.parent if parent.name == "checkpoints" else parent
    return None, path.parent if path.name == "checkpoints" else path


def load_run(path: str | Path, device: str = "auto") -> SavedRun:
    """Load a run from its directory (newest checkpoint) or from one checkpoint file.

    The task is rebuilt from the run directory's ``config.json``. Raises
    ``ConfigError`` saying what is missing or unusable.
    """
    checkpoint, run_dir = _checkpoint_and_run_dir(Path(path))
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"No config.json in {run_dir}: give a run directory written by `largebatch run` "
            "or a checkpoint inside its checkpoints/ folder"
        )
    try:
        config = RunConfig.from_dict(json.loads(config_file.read_text())["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"Unreadable run config {config_file}: {error}") from None
    try:
        if checkpoint is None:
            found = load_latest(run_dir / "checkpoints", rename_corrupt=False)
            if found is None:
                raise ConfigError(f"No checkpoint in {run_dir / 'checkpoints'}")
            state, checkpoint = found
        else:
            state = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    task = get_task(config.task, **config.task_options)
    model = task.build_model()
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ConfigError(
            f"Checkpoint {checkpoint} does not fit task {config.task!r}: {error}"
        ) from None
    model.to(pick_device(device))
    step = state.get("progress", {}).get("step", -1)
    return SavedRun(run_dir, checkpoint, step, config, task, model)


@contextlib.contextmanager
def _timed(record: dict[str, Any], name: str) -> Iterator[None]:
    """Note the wall time of the enclosed block in ``record["wall_time_s"][name]``."""
    began = time.perf_counter()
    yield
    record["wall_time_s"][name] = time.perf_counter() - began


def training_subset(task: Task, settings: DiagnosticsSettings) -> list:
    """The fixed, seeded training batches every diagnostic of a run is measured on."""
    size = min(settings.num_examples, len(task.train))
    return fixed_subset(task.train, size, batch_size=settings.batch_size, seed=settings.seed)


def run_diagnostics(run: SavedRun, settings: DiagnosticsSettings) -> dict[str, Any]:
    """Measure ``run`` as ``settings`` says; a JSON-ready record (see the docs for its keys)."""
    model, loss_fn, seed, train = run.model, run.task.loss_fn, settings.seed, settings.train_mode
    data = training_subset(run.task, settings)
    record: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "settings": settings.to_dict(),
        "num_examples": sum(len(targets) for _, targets in data),
        "subset": evaluate(model, loss_fn, data, run.task.metrics, train=train, seed=seed),
        "wall_time_s": {},
    }
    wanted = settings.diagnostics
    if "sharpness" in wanted:
        with _timed(record, "sharpness"):
            record["sharpness"] = [
                epsilon_sharpness(
                    model, loss_fn, data, epsilon=epsilon, subspace_dim=space,
                    max_iter=settings.max_iter, seed=seed, train=train,
                ).to_dict()
                for space in _spaces(settings)
                for epsilon in settings.epsilons
            ]  # fmt: skip
    hessian = HessianOperator(model, loss_fn, data, train=train, seed=seed)
    if "eigenvalues" in wanted:
        with _timed(record, "eigenvalues"):
            k = min(settings.k, hessian.dim)
            record["eigenvalues"] = top_eigenvalues(
                hessian, k, tol=settings.tol, max_products=settings.max_products, seed=seed
            ).to_dict()
    if "trace" in wanted:
        with _timed(record, "trace"):
            record["trace"] = hutchinson_trace(hessian, settings.num_probes, seed=seed).to_dict()
    if "density" in wanted:
        with _timed(record, "density"):
            density = spectral_density(hessian, num_steps=settings.density_steps, seed=seed)
            record["density"] = density.to_dict()
    return record


def _spaces(settings: DiagnosticsSettings) -> list[int | None]:
    """The sharpness spaces: full (``None``), then the random subspace if one is set."""
    return [None] + ([settings.subspace_dim] if settings.subspace_dim else [])


def sharpness_name(subspace_dim: int | None, epsilon: float) -> str:
    """``sharpness``, ``sharpness_subspace``, ``sharpness_eps0.0005``, ..."""
    name = "sharpness" if subspace_dim is None else "sharpness_subspace"
    return name if epsilon == MAIN_EPSILON else f"{name}_eps{epsilon:g}"


def summary_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a :func:`run_diagnostics` record, by column name.

    ``sharpness[_subspace][_epsE]`` per sharpness measured, ``top_eigenvalue``,
    ``hessian_trace`` and ``hessian_trace_stderr``.
    """
    metrics = {}
    for result in record.get("sharpness", []):
        metrics[sharpness_name(result["subspace_dim"], result["epsilon"])] = result["sharpness"]
    if "eigenvalues" in record:
        metrics["top_eigenvalue"] = record["eigenvalues"]["eigenvalues"][0]
    if "trace" in record:
        metrics["hessian_trace"] = record["trace"]["trace"]
        metrics["hessian_trace_stderr"] = record["trace"]["stderr"]
    return metrics


def expected_metrics(settings: DiagnosticsSettings) -> list[str]:
    """The names :func:`summary_metrics` gives for a record measured with ``settings``."""
    names = []
    if "sharpness" in settings.diagnostics:
        names += [sharpness_name(s, e) for s in _spaces(settings) for e in settings.epsilons]
    if "eigenvalues" in settings.diagnostics:
        names.append("top_eigenvalue")
    if "trace" in settings.diagnostics:
        names += ["hessian_trace", "hessian_trace_stderr"]
    return names


def interpolate_runs(
    run_a: SavedRun, run_b: SavedRun, settings: DiagnosticsSettings
) -> InterpolationResult:
    """Loss and metrics along ``(1 - a) x_A + a x_B``, a in [-1, 2], on train and test subsets.

    Both runs must be of the same task (name and options). The subsets are the
    seeded training subset of :func:`training_subset` and as many test examples.
    """
    same_task = (run_a.config.task, run_a.config.task_options) == (
        run_b.config.task,
        run_b.config.task_options,
    )
    if not same_task:
        raise ConfigError(
            f"Cannot interpolate between different tasks: {run_a.config.task!r} "
            f"{run_a.config.task_options} and {run_b.config.task!r} {run_b.config.task_options}"
        )
    # copies: the model's own state dict would change as the points are loaded into it
    state_a, state_b = ({k: v.detach().clone() for k, v in run.model.state_dict().items()}
                        for run in (run_a, run_b))  # fmt: skip
    task = run_a.task
    test_size = min(settings.num_examples, len(task.test))
    splits = {
        "train": training_subset(task, settings),
        "test": fixed_subset(
            task.test, test_size, batch_size=settings.batch_size, seed=settings.seed
        ),
    }
    return interpolate_checkpoints(
        run_a.model, state_a, state_b, task.loss_fn, splits, metrics=task.metrics
    )
