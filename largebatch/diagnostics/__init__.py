"""Diagnostics of why large batches hurt: flatness, curvature and gradient noise.

The measurements only: every function takes a model, its loss function and
fixed data (a list of ``(inputs, targets)`` batches, e.g. from
:func:`fixed_subset`) and imports nothing of the training engine or the
experiments. Running them on saved runs (``largebatch diagnose``, sweeps) lives
in :mod:`largebatch.experiments.checkpoint_diagnostics`. Results are small
dataclasses with ``to_dict()``.
"""

from largebatch.diagnostics.evaluation import evaluate, fixed_subset
from largebatch.diagnostics.hessian import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)
from largebatch.diagnostics.hvp import HessianOperator
from largebatch.diagnostics.interpolation import (
    InterpolationResult,
    SliceResult,
    filter_normalized_direction,
    interpolate_checkpoints,
    loss_slice,
)
from largebatch.diagnostics.noise_scale import (
    GradientNormRecorder,
    NoiseScaleEstimate,
    NoiseScaleTracker,
    gradient_sqnorm,
    two_batch_estimates,
)
from largebatch.diagnostics.per_example import (
    GradientStatistics,
    gradient_statistics,
    per_example_gradients,
)
from largebatch.diagnostics.sharpness import SharpnessResult, epsilon_sharpness, random_subspace

__all__ = [
    "EigenResult",
    "GradientNormRecorder",
    "GradientStatistics",
    "HessianOperator",
    "InterpolationResult",
    "NoiseScaleEstimate",
    "NoiseScaleTracker",
    "SharpnessResult",
    "SliceResult",
    "SpectralDensity",
    "TraceResult",
    "epsilon_sharpness",
    "evaluate",
    "filter_normalized_direction",
    "fixed_subset",
    "gradient_statistics",
    "gradient_sqnorm",
    "hutchinson_trace",
    "interpolate_checkpoints",
    "loss_slice",
    "per_example_gradients",
    "random_subspace",
    "spectral_density",
    "top_eigenvalues",
    "two_batch_estimates",
]
