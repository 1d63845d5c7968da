"""Compiled optimizer steps: one ``torch.compile`` machinery shared by LARS, LAMB and ALTO.

An algorithm supplies a *per-tensor step*: a function that updates one parameter's
tensors in place (and may return per-tensor values such as norms) using only tensor
ops, written so that its hyperparameters may be Python floats (eager) or 0-dim
tensors (compiled). :class:`CompiledStep` runs that function over a whole parameter
group through ``torch.compile`` (inductor), so each parameter's update becomes one
fused loop instead of one memory pass per ``torch._foreach_*`` op.

Design (each choice measured on CPU, see ``docs/optimizers.md``):

* **Flat aliases + dynamic shapes.** Every tensor is passed as a flat, non-view
  alias (``t.view(-1).detach()``) and compiled with ``dynamic=True`` and duck sizing
  off, so one graph serves every parameter shape of every model: compile cost does
  not grow with the model and inductor's on-disk cache is reused across models and
  runs.
* **Chunks.** Tensors go through the compiled function :data:`CHUNK_SIZE` at a time
  (the remainder one at a time), which keeps Python and guard overhead per step low
  without unrolling a whole model into one graph. At most two graphs per step
  function, dtype and option set.
* **Hyperparameters as tensors.** Floats (``lr``, betas, ...) become 0-dim tensors on
  the parameters' device (``torch.full``, no host copy), so a learning-rate scheduler
  never triggers recompilation and nothing synchronises with the host. Options that
  change the code (Nesterov on/off, ``maximize``) stay Python values and specialise
  the graph.
* **Per-tensor scalars precomputed.** Values such as Adam's bias corrections or trust
  ratios are computed once per group by the caller and passed in as 0-dim tensors;
  inside a fused loop inductor would otherwise recompute them for every vector of
  elements.

Tensors whose memory is not contiguous (e.g. channels-last parameters) run the same
per-tensor step eagerly, which is slower but exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch._dynamo
import torch.fx.experimental._config as fx_config
from torch import Tensor

CHUNK_SIZE = 8
"""Tensors per compiled call; calls of one tensor take the remainder."""

RECOMPILE_LIMIT = 256
"""Graphs allowed for the shared chunk runner (step functions x dtypes x option sets x 2 sizes)."""

TensorStep = Callable[..., Any]


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of hyperparameter tensors for parameters of ``dtype`` (float32 at least)."""
    return torch.promote_types(dtype, torch.float32)


def hyperparameter_tensors(
    values: Mapping[str, float], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Each float as a 0-dim tensor filled on ``device`` (no host-to-device copy, no sync)."""
    dtype = scalar_dtype(dtype)
    return {
        name: torch.full((), value, dtype=dtype, device=device) for name, value in values.items()
    }


def _run_chunk(
    tensor_step: TensorStep,
    tensor_lists: Sequence[Sequence[Tensor]],
    hyperparameters: Mapping[str, Any],
) -> list[Any]:
    """Apply ``tensor_step`` to each tensor of a chunk (this is what gets compiled)."""
    return [tensor_step(*tensors, **hyperparameters) for tensors in zip(*tensor_lists)]


def _flat_alias(tensor: Tensor) -> Tensor:
    """A 1-D alias of a contiguous tensor that is not a view (so graphs ignore the base's shape)."""
    return tensor.view(-1).detach() if tensor.dim() else tensor


class CompiledStep:
    """A per-tensor step function, run over many tensors through ``torch.compile``.

    Example (one group; the state lists are parallel to ``params``)::

        lars_compiled = CompiledStep(lars_tensor_step_)
        lars_compiled(
            [params, grads, momentum_buffers],
            scalar_lists=[trust_ratios],                           # one 0-dim tensor each
            hyperparameters={"lr": 0.1, "momentum": 0.9, ...},   # floats -> 0-dim tensors
            options={"nesterov": False},                          # Python values, static
        )

    Args:
        tensor_step: ``tensor_step(*tensors, **hyperparameters, **options)`` updates one
            parameter's tensors in place and may return values (e.g. norms).
            ``tensors`` holds, in order, one entry of each list in ``tensor_lists``
            then of each list in ``scalar_lists``.
        inductor_options: ``torch.compile(options=...)`` for this step's graphs.
    """

    def __init__(
        self, tensor_step: TensorStep, *, inductor_options: Mapping[str, Any] | None = None
    ) -> None:
        self.tensor_step = tensor_step
        self.inductor_options = dict(inductor_options or {})
        self._compiled: Callable[..., list[Any]] | None = None

    def _compiled_runner(self) -> Callable[..., list[Any]]:
        if self._compiled is None:
            self._compiled = torch.compile(
                _run_chunk, fullgraph=True, dynamic=True, options=self.inductor_options or None
            )
        return self._compiled

    def __call__(
        self,
        tensor_lists: Sequence[Sequence[Tensor]],
        *,
        scalar_lists: Sequence[Sequence[Tensor]] = (),
        hyperparameters: Mapping[str, float],
        options: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Update every tensor of one parameter group in place; what each call returned, in order.

        Args:
            tensor_lists: parallel lists of same-shape tensors (parameters first, then
                gradients and state); all on one device with one dtype.
            scalar_lists: parallel lists of per-tensor 0-dim tensors (e.g. bias
                corrections), precomputed by the caller.
            hyperparameters: floats shared by the group; passed as 0-dim tensors.
            options: values that change the code path; passed unchanged.
        """
        params = tensor_lists[0]
        if not params:
            return []
        kwargs: dict[str, Any] = hyperparameter_tensors(
            hyperparameters, params[0].device, params[0].dtype
        )
        kwargs.update(options or {})

        flat = [
            all(tensors[i].is_contiguous() for tensors in tensor_lists) for i in range(len(params))
        ]
        eager = [i for i, is_flat in enumerate(flat) if not is_flat]
        compiled = [i for i, is_flat in enumerate(flat) if is_flat]
        results: list[Any] = [None] * len(params)
        if eager:
            outputs = _run_chunk(
                self.tensor_step, select_entries([*tensor_lists, *scalar_lists], eager), kwargs
            )
            for i, output in zip(eager, outputs):
                results[i] = output
        lists = [
            [_flat_alias(t) for t in tensors] for tensors in select_entries(tensor_lists, compiled)
        ] + select_entries(scalar_lists, compiled)

        runner = self._compiled_runner()
        with (
            fx_config.patch(use_duck_shape=False),
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        ):
            start = 0
            for size in (CHUNK_SIZE, 1):
                while len(compiled) - start >= size:
                    outputs = runner(
                        self.tensor_step, [t[start : start + size] for t in lists], kwargs
                    )
                    for i, output in zip(compiled[start : start + size], outputs):
                        results[i] = output
                    start += size
        return results


def select_entries(lists: Sequence[Sequence[Tensor]], indices: Sequence[int]) -> list[list[Tensor]]:
    """The entries at ``indices`` of every list."""
    return [[tensors[i] for i in indices] for tensors in lists]
