"""One registry of tasks: it drives ``get_task``, ``largebatch list tasks`` and the docs.

A task name is either a registered name (``mnist1d-cnn``) or a user task given as
``package.module:function``; the function is called with the task options and
must return a :class:`~largebatch.tasks.base.Task`. A registered task's options
and their defaults are read from its builder's signature, so they are written once.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from largebatch.tasks import digits, logreg, mnist1d, modadd, teacher_student
from largebatch.tasks.base import Task
from largebatch.utils.errors import ConfigError, TaskError, UnknownNameError, unknown_name_message

TaskBuilder = Callable[..., Task]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: registry key, as typed on the command line.
        description: one line for ``largebatch list tasks`` and the docs.
        options: option name -> default value (the builder's keyword arguments).
        build: the builder; ``build(**options)`` returns the :class:`Task`.
    """

    name: str
    description: str
    options: Mapping[str, Any]
    build: TaskBuilder = field(repr=False, compare=False)


_REGISTRY: dict[str, TaskSpec] = {}


def register(name: str, build: TaskBuilder, description: str) -> TaskSpec:
    """Register ``build`` under ``name``; its keyword arguments become the task's options."""
    if name in _REGISTRY:
        raise ConfigError(f"task {name!r} is already registered")
    options = {
        p.name: p.default
        for p in inspect.signature(build).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    spec = TaskSpec(name, description, MappingProxyType(options), build)
    _REGISTRY[name] = spec
    return spec


def list_tasks() -> list[TaskSpec]:
    """All registered tasks, in registration order."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> TaskSpec:
    """The spec registered under ``name``; an ``UnknownNameError`` (a ``KeyError``) listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(unknown_name_message("task", name, _REGISTRY)) from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in _TRUE | _FALSE:
        raise ValueError(text)
    return lowered in _TRUE


# option type -> (accepted non-string values, parser for strings from the command line)
_CONVERSIONS: dict[type, tuple[type, Callable[[str], Any]]] = {
    bool: (bool, _parse_bool),
    int: (numbers.Integral, int),
    float: (numbers.Real, float),
}


def _coerce(option: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default``; a ``ConfigError`` naming ``option`` if it can't be."""
    kind = type(default)
    if kind not in _CONVERSIONS:
        return value
    accepted, parse = _CONVERSIONS[kind]
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError:
            pass
    elif isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return kind(value)
    raise ConfigError(
        f"Invalid value for task option {option!r}: {value!r} (expected {kind.__name__})"
    )


def option_defaults(name: str) -> Mapping[str, Any]:
    """Option -> default of task ``name``; a user task's function is imported, and its
    parameters without a default map to ``inspect.Parameter.empty`` (any value)."""
    if ":" not in name:
        return get_spec(name).options
    parameters = inspect.signature(load_user_builder(name)).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name: p.default for p in parameters if p.kind not in variadic}


def validated_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of task ``name``, checked and converted to their defaults' types.

    The one check of task options (``RunConfig``, sweeps, ``get_task``). Raises
    ``UnknownNameError`` for an unknown task and ``ConfigError`` (a
    ``ValueError``) naming an unknown option or a value of the wrong type.
    """
    defaults = option_defaults(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for task {name!r}. "
            f"Valid options: {', '.join(defaults) or '(none)'}."
        )
    return {key: _coerce(key, value, defaults[key]) for key, value in options.items()}


def split_user_task(target: str) -> tuple[str, str]:
    """``"package.module:function"`` -> ``("package.module", "function")``; ``ConfigError`` if malformed."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"Invalid user task {target!r}: expected 'package.module:function'")
    return module_name, attr


def load_user_builder(target: str) -> TaskBuilder:
    """Import the function named by ``package.module:function``.

    The current directory is importable, as with ``python -m``, so a task module
    next to where the command runs is found.
    """
    module_name, attr = split_user_task(target)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"Cannot import module {module_name!r} for task {target!r}: {exc}"
        ) from exc
    except Exception as exc:  # the module itself raised while being imported
        raise TaskError(
            f"Importing {module_name!r} for task {target!r} raised {_where(exc)}"
        ) from exc
    try:
        builder = getattr(module, attr)
    except AttributeError:
        raise ImportError(
            f"Module {module_name!r} has no attribute {attr!r} (task {target!r})"
        ) from None
    if not callable(builder):
        raise TypeError(f"Task {target!r} is not callable: {builder!r}")
    return builder


def get_task(name: str, **options: Any) -> Task:
    """Build the task ``name`` (registered, or ``package.module:function``) with ``options``.

    Raises:
        KeyError: ``name`` is neither registered nor of the form ``module:function``.
        ConfigError: an unknown option, or a bad option value (the message names it);
            a user task's options must fit its function's signature.
        ImportError: a user task's module or function cannot be imported.
        TypeError: a user task returned something other than a ``Task``.
        TaskError: a user task's function raised (the exception is the ``__cause__``).
    """
    options = validated_options(name, options)
    if ":" in name:
        builder = load_user_builder(name)
        try:
            inspect.signature(builder).bind(**options)
        except TypeError as exc:
            raise ConfigError(f"Invalid options for task {name!r}: {exc}") from None
        try:
            task = builder(**options)
        except Exception as exc:
            raise TaskError(f"Task {name!r} raised {_where(exc)}") from exc
        if not isinstance(task, Task):
            raise TypeError(
                f"Task {name!r} returned {type(task).__name__}, expected largebatch.tasks.Task"
            )
        return task
    spec = get_spec(name)
    task = spec.build(**options)
    return replace(task, description=task.description or spec.description)


def _where(exc: Exception) -> str:
    """``Type: message (file:line)`` of an exception, at the innermost frame it passed."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{place}"


# --- the registry -----------------------------------------------------------------

register(
    "mnist1d-cnn",
    mnist1d.mnist1d_cnn,
    "MNIST-1D (generated, 10 classes) with a 3-layer 1-D CNN (~5k parameters). Default task.",
)
register(
    "mnist1d-mlp",
    mnist1d.mnist1d_mlp,
    "MNIST-1D (generated, 10 classes) with a 2-hidden-layer ReLU MLP.",
)
register(
    "digits-cnn",
    digits.digits_cnn,
    "scikit-learn's bundled 8x8 handwritten digits (1,797 images) with a small 2-D CNN.",
)
register(
    "teacher-student",
    teacher_student.teacher_student,
    "Gaussian inputs labelled by a random tanh teacher (optional label noise); student MLP.",
)
register(
    "logreg",
    logreg.logreg,
    "Convex logistic regression on sparse, Zipf-distributed bag-of-words tf-idf features.",
)
register(
    "modadd-transformer",
    modadd.modadd_transformer,
    "Modular addition a + b mod 97 with a small decoder-only transformer (token inputs).",
)
