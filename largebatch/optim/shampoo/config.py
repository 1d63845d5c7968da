"""Typed, frozen configuration of :class:`~largebatch.optim.shampoo.optimizer.Shampoo`.

Each dataclass validates itself at construction, so a bad value fails where it is
written, with a ``ValueError`` that names it. Scalar hyperparameters (learning rate,
betas, block size, frequencies) are plain keyword arguments of the optimizer; the
dataclasses group the settings of its two pluggable parts: the grafted optimizer that
sets each block's step size, and the inverse-root computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: the validation of every setting."""
    if not condition:
        raise ValueError(message)


# --- grafting: the optimizer whose per-block step norm Shampoo's direction inherits ---


@dataclass(frozen=True)
class AdaGradGraftingConfig:
    """AdaGrad's step (running sum of squared gradients), the paper's choice."""

    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        require(self.epsilon > 0.0, f"Invalid grafting epsilon: {self.epsilon}")


@dataclass(frozen=True)
class RMSpropGraftingConfig:
    """RMSprop's step (second moment EMA without bias correction)."""

    beta2: float = 0.99
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        require(0.0 <= self.beta2 < 1.0, f"Invalid grafting beta2: {self.beta2}")
        require(self.epsilon > 0.0, f"Invalid grafting epsilon: {self.epsilon}")


@dataclass(frozen=True)
class AdamGraftingConfig(RMSpropGraftingConfig):
    """Adam's step: RMSprop's with bias corrections; the default, so Shampoo drops into AdamW recipes."""

    beta2: float = 0.999


@dataclass(frozen=True)
class SGDGraftingConfig:
    """SGD's step: the (momentum) gradient itself."""


GraftingConfig = (
    AdamGraftingConfig | AdaGradGraftingConfig | RMSpropGraftingConfig | SGDGraftingConfig
)
GRAFTING_CONFIGS: dict[str, type] = {
    "adam": AdamGraftingConfig,
    "adagrad": AdaGradGraftingConfig,
    "rmsprop": RMSpropGraftingConfig,
    "sgd": SGDGraftingConfig,
}


def grafting_config(value: GraftingConfig | str) -> GraftingConfig:
    """A grafting config, or the default one for a name (``"adam"``, ``"sgd"``, ...)."""
    if isinstance(value, str):
        require(
            value in GRAFTING_CONFIGS,
            f"Invalid grafting: {value!r}; valid names: {', '.join(GRAFTING_CONFIGS)}",
        )
        return GRAFTING_CONFIGS[value]()
    require(isinstance(value, tuple(GRAFTING_CONFIGS.values())), f"Invalid grafting: {value!r}")
    return value


# --- inverse roots -------------------------------------------------------------------


@dataclass(frozen=True)
class EighConfig:
    """Inverse roots by symmetric eigendecomposition, the robust default.

    Attributes:
        residual_tolerance: largest accepted backward error ``||A V - V diag(w)||_F / ||A||_F``
            of the decomposition; above it the root is rejected.
        retry_in_float64: redo a failed decomposition once in float64.
    """

    residual_tolerance: float = 1e-3
    retry_in_float64: bool = True

    def __post_init__(self) -> None:
        require(
            self.residual_tolerance > 0.0,
            f"Invalid eigh residual_tolerance: {self.residual_tolerance}",
        )


@dataclass(frozen=True)
class CoupledNewtonConfig:
    """Inverse roots by the coupled Newton iteration (Guo & Higham 2006), matrix products only.

    Attributes:
        max_iterations: iteration cap.
        tolerance: stop once ``max |M - I| <= tolerance``.
        max_error_ratio: stop, keeping the previous iterate, when the error grows by more
            than this factor in one iteration.
        failure_threshold: reject the root when the final ``max |M - I|`` is above this
            (0.1 in the paper's code).
        power_iterations: power-iteration steps estimating ``lambda_max`` for the ridge.
    """

    max_iterations: int = 100
    tolerance: float = 1e-6
    max_error_ratio: float = 1.2
    failure_threshold: float = 0.1
    power_iterations: int = 20

    def __post_init__(self) -> None:
        require(self.max_iterations >= 1, f"Invalid max_iterations: {self.max_iterations}")
        require(self.tolerance >= 0.0, f"Invalid Newton tolerance: {self.tolerance}")
        require(self.max_error_ratio >= 1.0, f"Invalid max_error_ratio: {self.max_error_ratio}")
        require(
            self.failure_threshold > 0.0, f"Invalid failure_threshold: {self.failure_threshold}"
        )
        require(self.power_iterations >= 1, f"Invalid power_iterations: {self.power_iterations}")


ROOT_METHODS: dict[str, type] = {"eigh": EighConfig, "coupled_newton": CoupledNewtonConfig}


@dataclass(frozen=True)
class RootConfig:
    """How inverse roots ``(A + ridge I)^(-1/p)`` are computed and when failures become errors.

    Attributes:
        method: :class:`EighConfig` or :class:`CoupledNewtonConfig`.
        compute_dtype: precision of the root computation (float32 or float64); results
            are stored in the statistics' dtype.
        relative_epsilon: ridge as a fraction of ``lambda_max(A)``: bounds the condition
            number near ``1 / relative_epsilon``, about what float32 can invert.
        max_consecutive_failures: a block whose root failed more often than this in a row
            raises :class:`RootComputationError`.
    """

    method: EighConfig | CoupledNewtonConfig = EighConfig()
    compute_dtype: torch.dtype = torch.float32
    relative_epsilon: float = 1e-6
    max_consecutive_failures: int = 3

    def __post_init__(self) -> None:
        require(
            isinstance(self.method, tuple(ROOT_METHODS.values())),
            f"Invalid root method: {self.method!r}",
        )
        require(
            self.compute_dtype in (torch.float32, torch.float64),
            f"Invalid root compute_dtype: {self.compute_dtype}",
        )
        require(self.relative_epsilon >= 0.0, f"Invalid relative_epsilon: {self.relative_epsilon}")
        require(
            self.max_consecutive_failures >= 0,
            f"Invalid max_consecutive_failures: {self.max_consecutive_failures}",
        )


def root_config(value: RootConfig | str) -> RootConfig:
    """A root config, or the default one for a method name (``"eigh"``, ``"coupled_newton"``)."""
    if isinstance(value, str):
        require(
            value in ROOT_METHODS,
            f"Invalid root method: {value!r}; valid names: {', '.join(ROOT_METHODS)}",
        )
        return RootConfig(method=ROOT_METHODS[value]())
    require(isinstance(value, RootConfig), f"Invalid roots config: {value!r}")
    return value


# --- data parallelism ----------------------------------------------------------------


@dataclass(frozen=True)
class DistributedConfig:
    """Share root computations across the ranks of a process group.

    The ranks must hold the same gradients (data parallelism) and step together.

    Attributes:
        enabled: ``False`` keeps every root on this process even under torch.distributed
            (e.g. ranks that train different models).
        process_group: the ``torch.distributed`` group; ``None`` means the default group.
    """

    enabled: bool = True
    process_group: Any = None


# --- a parameter group's hyperparameters ---------------------------------------------

MATMUL_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16)
"""Allowed ``matmul_dtype`` values (float16 is left out: ``G G^T`` overflows its range)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype(value: Any) -> Any:
    """A dtype given by name (``"bfloat16"``, e.g. from the command line) as ``torch.bfloat16``."""
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return value


def resolve_group(settings: dict[str, Any], asynchronous: bool) -> dict[str, Any]:
    """Validate a parameter group's hyperparameters; fill the defaults that depend on others."""
    lr = settings["lr"]
    require(isinstance(lr, (int, float)) and lr >= 0.0, f"Invalid learning rate: {lr}")
    betas = settings["betas"]
    require(len(betas) == 2, f"Invalid betas: {betas}")
    require(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
    require(0.0 < betas[1] <= 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
    require(settings["epsilon"] > 0.0, f"Invalid epsilon: {settings['epsilon']}")
    require(settings["weight_decay"] >= 0.0, f"Invalid weight_decay: {settings['weight_decay']}")
    for key in ("nesterov", "maximize"):
        require(isinstance(settings[key], bool), f"Invalid {key}: {settings[key]!r}")
    for key in ("max_preconditioner_dim", "max_preconditioned_dim", "precondition_frequency"):
        value = settings[key]
        require(_is_int(value) and value >= 1, f"Invalid {key}: {value}")
    frequency = settings["precondition_frequency"]
    staleness = settings["staleness"]
    if staleness is None:
        staleness = max(1, frequency // 4) if asynchronous else 0
    require(
        _is_int(staleness) and 0 <= staleness <= frequency,
        f"Invalid staleness: {staleness} (must be in [0, precondition_frequency={frequency}])",
    )
    require(
        staleness >= 1 or not asynchronous,
        f"Invalid staleness: {staleness} (asynchronous roots need staleness >= 1)",
    )
    start = settings["start_preconditioning_step"]
    if start is None:
        start = frequency + staleness
    require(_is_int(start) and start >= 1, f"Invalid start_preconditioning_step: {start}")
    factor_dtype = _dtype(settings["factor_dtype"])
    require(
        factor_dtype in (torch.float32, torch.float64),
        f"Invalid factor_dtype: {settings['factor_dtype']}",
    )
    matmul_dtype = _dtype(settings["matmul_dtype"])
    require(
        matmul_dtype in MATMUL_DTYPES,
        f"Invalid matmul_dtype: {settings['matmul_dtype']} (expected one of {MATMUL_DTYPES})",
    )
    return {
        **settings,
        "factor_dtype": factor_dtype,
        "matmul_dtype": matmul_dtype,
        "staleness": staleness,
        "start_preconditioning_step": start,
        "grafting": grafting_config(settings["grafting"]),
        "roots": root_config(settings["roots"]),
    }


# Configs are stored in param_groups, so optimizer checkpoints contain them; let
# ``torch.load(weights_only=True)`` (the default) rebuild them.
torch.serialization.add_safe_globals(
    [*GRAFTING_CONFIGS.values(), *ROOT_METHODS.values(), RootConfig]
)
