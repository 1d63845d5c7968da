"""Per-sample gradient norms and projections from one ordinary forward/backward pass.

A forward hook on each layer that owns a chosen parameter saves the layer's
input ``a`` and, through a hook on its output, the gradient ``g`` that the
backward pass brings there. The gradient of a sample's loss with respect to the
layer's weight is then a sum over the sample's positions (sequence steps,
convolution windows, and the ``m`` examples of a group)::

    Linear, Conv (unfolded input):  G_i = sum_t g_it a_it^T,  bias: sum_t g_it
    LayerNorm:                      sum_t g_it * normalize(a_it),  bias: sum_t g_it
    Embedding:                      row r of G_i = sum_{t: a_it = r} g_it

``||G_i||^2`` comes either from ``G_i`` itself (``q x p`` numbers per sample) or
from the Gram matrices, ``sum_{t,s} (a_it . a_is)(g_it . g_is)`` (``T^2``
products), whichever is cheaper for the layer's shapes; a projection on the mean
gradient ``W`` is ``sum_t g_it . (W a_it)``, a second forward of the layer.

The loss must be the mean of per-example losses (then the sample's gradient is
``batch / m`` times the part of the batch gradient its examples carry). The
layers must see the batch as their input's first dimension: a call with another
leading size (a position embedding over ``arange(T)``) raises
:class:`UnsupportedModel`, as does a model with a parameter outside
:data:`SUPPORTED_LAYERS` (grouped convolutions, non-zero padding modes, sparse or
renormalised embeddings, parameters shared between modules);
:func:`~largebatch.diagnostics.per_example.gradient_statistics` then uses
``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: the layers whose parameters' per-sample statistics come from hooks
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding)


class UnsupportedModel(Exception):
    """The hooks cannot give this model's per-sample gradients (the message says why)."""


def unsupported_reason(model: nn.Module, params: Sequence[nn.Parameter]) -> str | None:
    """Why the hooks cannot handle ``params`` of ``model`` (``None``: they can)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    for p in params:
        if not p.requires_grad:
            return "a parameter does not require grad"
        modules = owners.get(id(p), [])
        if len(modules) != 1:
            return "a parameter is shared between modules"
        module = modules[0]
        if not isinstance(module, SUPPORTED_LAYERS):
            return f"{type(module).__name__} has no hook rule"
        if isinstance(module, nn.Conv1d | nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return "only ungrouped convolutions with numeric zero padding have a hook rule"
        if isinstance(module, nn.Embedding) and (
            module.sparse or module.max_norm is not None or module.scale_grad_by_freq
        ):
            return "only dense embeddings without renormalisation have a hook rule"
    return None


class _Factors:
    """Sample gradients ``G_i = scale * sum_t g_it a_it^T`` kept as their factors: output
    gradients ``(K, q, T)`` (the layout a convolution's come in: no copy) and inputs ``(K, T, p)``."""

    def __init__(
        self, g: Tensor, a: Tensor, scale: float, matrix: Callable[[Tensor], Tensor]
    ) -> None:
        self.g, self.a, self.scale, self.matrix = g, a, scale, matrix

    def sqnorms(self) -> Tensor:
        samples, q, positions = self.g.shape
        p = self.a.shape[2]
        if q * p <= positions * (p + q):  # materialise G_i
            grads = (self.g @ self.a).reshape(samples, -1)
            sqnorms = torch.linalg.vecdot(grads, grads)
        else:
            grams = (self.a @ self.a.transpose(1, 2)) * (self.g.transpose(1, 2) @ self.g)
            sqnorms = grams.sum((1, 2))
        return sqnorms * self.scale**2

    def projections(self, mean: Tensor) -> Tensor:
        weight = self.matrix(mean).to(self.a.dtype)
        return (weight @ self.a.transpose(1, 2) * self.g).sum((1, 2)) * self.scale


class _Conv1dGram:
    """A 1-D convolution's sample gradients (one call, one example per sample) by the Gram trick,
    with the windows' Gram matrix summed from slices of the input's: no unfolded copy.

    ``a``: the input ``(K, C, L)``; ``g``: the output gradient ``(K, q, T)``.
    """

    def __init__(self, module: nn.Conv1d, a: Tensor, g: Tensor, scale: float) -> None:
        self.module, self.a, self.g, self.scale = module, a, g, scale

    def sqnorms(self) -> Tensor:
        (kernel,), (dilation,), (padding,), (stride,) = (
            self.module.kernel_size,
            self.module.dilation,
            self.module.padding,
            self.module.stride,
        )
        length, positions = self.a.shape[2], self.g.shape[2]
        inputs = self.a.transpose(1, 2) @ self.a  # (K, L, L): input position products
        windows = inputs.new_zeros(len(inputs), positions, positions)
        for tap in range(kernel):  # window t reads input t * stride + offset at this tap
            offset = tap * dilation - padding
            first = max(0, -(offset // stride))  # the first window inside the input
            last = min(positions, (length - 1 - offset) // stride + 1)
            if last <= first:
                continue
            begin, end = first * stride + offset, (last - 1) * stride + offset + 1
            taps = inputs[:, begin:end:stride, begin:end:stride]
            windows[:, first:last, first:last] += taps
        outputs = self.g.transpose(1, 2) @ self.g
        return (windows * outputs).sum((1, 2)) * self.scale**2

    def projections(self, mean: Tensor) -> Tensor:
        module = self.module
        forward = F.conv1d(
            self.a, mean.to(self.a.dtype), None, module.stride, module.padding, module.dilation
        )
        return (forward * self.g).sum((1, 2)) * self.scale


class _Rows:
    """Sample gradients held as rows ``(K, numel)``."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def sqnorms(self) -> Tensor:
        return self.rows.pow(2).sum(1)

    def projections(self, mean: Tensor) -> Tensor:
        return self.rows @ mean.reshape(-1).to(self.rows.dtype)

    def mean(self) -> Tensor:
        return self.rows.mean(0)


class _EmbeddingRows:
    """Embedding sample gradients: ``scale * g_it`` added to row ``a_it``; indices ``(K, T)``,
    ``g`` ``(K, T, d)``, ``rows`` rows in the table."""

    def __init__(self, indices: Tensor, g: Tensor, scale: float, rows: int) -> None:
        self.indices, self.g, self.scale, self.rows = indices, g, scale, rows

    def sqnorms(self) -> Tensor:
        same_row = self.indices.unsqueeze(2) == self.indices.unsqueeze(1)
        return ((self.g @ self.g.transpose(1, 2)) * same_row).sum((1, 2)) * self.scale**2

    def projections(self, mean: Tensor) -> Tensor:
        return (mean.to(self.g.dtype)[self.indices] * self.g).sum((1, 2)) * self.scale

    def mean(self) -> Tensor:
        total = self.g.new_zeros(self.rows, self.g.shape[2])
        total.index_add_(0, self.indices.reshape(-1), self.g.reshape(-1, self.g.shape[2]))
        return total * (self.scale / len(self.g))


SampleGradients = _Factors | _Rows | _EmbeddingRows


class HookRecorder:
    """Records the inputs and output gradients of the layers owning ``params`` during a pass.

    Use as a context manager around one forward and backward pass of a batch;
    :meth:`sample_gradients` then gives each parameter's sample gradients in a
    form whose squared norms and projections are cheap.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        reason = unsupported_reason(model, params)
        if reason is not None:
            raise UnsupportedModel(reason)
        chosen = {id(p) for p in params}
        self.layers = [
            m for m in model.modules() if any(id(p) in chosen for p in m.parameters(recurse=False))
        ]
        self.params = list(params)
        self.calls: dict[nn.Module, list[list[Tensor | None]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HookRecorder:
        self.calls = {m: [] for m in self.layers}
        self._handles = [m.register_forward_hook(self._save) for m in self.layers]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _save(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad:
            return
        call: list[Tensor | None] = [inputs[0].detach(), None]
        self.calls[module].append(call)

        def save_gradient(gradient: Tensor) -> None:
            call[1] = gradient.detach()

        output.register_hook(save_gradient)

    def sample_gradients(
        self, batch: int, group_size: int, scale: float
    ) -> list[tuple[nn.Parameter, SampleGradients]]:
        """Each chosen parameter's sample gradients, with the output gradients times ``scale``.

        ``batch`` examples went through the pass, in groups of ``group_size``
        consecutive examples; ``scale`` turns the batch loss's gradient into the
        samples' (``batch / group_size`` for a mean loss).
        """
        chosen = {id(p) for p in self.params}
        result = []
        for module, calls in self.calls.items():
            done = [(a, g) for a, g in calls if g is not None]
            if any(len(a) != batch for a, _ in done):
                raise UnsupportedModel(
                    f"a {type(module).__name__} saw an input whose first dimension is not the batch"
                )
            pieces = _sample_gradients(module, done, batch // group_size, scale)
            result += [
                (p, pieces[name])
                for name, p in module.named_parameters(recurse=False)
                if id(p) in chosen
            ]
        return result


def _positions(tensors: list[Tensor], samples: int) -> Tensor:
    """Each call's ``(batch, ..., width)`` as ``(samples, positions, width)``, the calls'
    positions side by side: a sample's gradient sums over its examples and the calls."""
    pieces = [t.reshape(samples, -1, t.shape[-1]) for t in tensors]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _columns(tensors: list[Tensor], samples: int) -> Tensor:
    """Each call's output gradient ``(batch, q, positions)`` as ``(samples, q, positions)``,
    the calls' (and a group's examples') positions side by side."""
    pieces = [
        t.reshape(samples, -1, *t.shape[1:]).transpose(1, 2).reshape(samples, t.shape[1], -1)
        for t in tensors
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)


def _layer_factors(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's inputs ``(batch, positions, p)`` and output gradients ``(batch, q, positions)``,
    with ``G_i = sum_t g_t a_t^T`` over the positions."""
    batch = len(a)
    if isinstance(module, nn.Linear):
        return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1]).transpose(1, 2)
    # a convolution: unfolded input windows against the output gradient at each position
    if isinstance(module, nn.Conv1d):
        # windows of the padded, channels-last input, in (kernel, channel) order: cheaper than unfold
        (kernel,), (dilation,), (padding,), (stride,) = (
            module.kernel_size,
            module.dilation,
            module.padding,
            module.stride,
        )
        span = dilation * (kernel - 1) + 1
        channels_last = F.pad(a, (padding, padding)).transpose(1, 2).contiguous()
        windows = channels_last.unfold(1, span, stride)[..., ::dilation].transpose(2, 3)
        windows = windows.reshape(batch, windows.shape[1], -1)
    else:
        spread = [module.kernel_size, module.dilation, module.padding, module.stride]
        windows = F.unfold(a, *spread).transpose(1, 2)
    return windows.contiguous(), g.reshape(batch, g.shape[1], -1)


def _weight_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """A weight (or its gradient) as the ``(q, p)`` matrix that :func:`_layer_factors`' windows multiply."""
    if isinstance(module, nn.Conv1d):
        return weight.transpose(1, 2).reshape(len(weight), -1)
    return weight.reshape(len(weight), -1)


def _input_gram_is_cheaper(
    module: nn.Module, calls: list[tuple[Tensor, Tensor]], samples: int
) -> bool:
    """Whether :class:`_Conv1dGram` serves this layer: a 1-D convolution called once on single
    examples, whose ``q x p`` sample gradients cost more than the Gram matrices."""
    if not isinstance(module, nn.Conv1d) or len(calls) != 1 or len(calls[0][0]) != samples:
        return False
    out_channels, in_channels, kernel = module.weight.shape
    positions = calls[0][1].shape[2]
    return out_channels * in_channels * kernel > positions * (out_channels + in_channels * kernel)


def _sample_gradients(
    module: nn.Module, calls: list[tuple[Tensor, Tensor]], samples: int, scale: float
) -> dict[str, SampleGradients]:
    """``name -> sample gradients`` of one layer's parameters, summed over its calls."""
    named = dict(module.named_parameters(recurse=False))
    dtype = torch.promote_types(module.weight.dtype, torch.float32)
    if not calls:  # unused in this pass: zero gradients
        return {
            name: _Rows(p.new_zeros(samples, p.numel(), dtype=dtype)) for name, p in named.items()
        }
    if isinstance(module, nn.Embedding):
        indices = _positions([a.unsqueeze(-1) for a, _ in calls], samples)[..., 0]
        g = _positions([g.to(dtype) for _, g in calls], samples)
        if module.padding_idx is not None:
            g = g * (indices != module.padding_idx).unsqueeze(2)
        return {"weight": _EmbeddingRows(indices, g, scale, module.num_embeddings)}
    if isinstance(module, nn.LayerNorm):
        width = math.prod(module.normalized_shape)
        normalized = [
            F.layer_norm(a.to(dtype), module.normalized_shape, eps=module.eps) for a, _ in calls
        ]
        a = _positions([n.reshape(len(n), -1, width) for n in normalized], samples)
        g = _positions([g.to(dtype).reshape(len(g), -1, width) for _, g in calls], samples)
        pieces = {"weight": _Rows((a * g).sum(1) * scale)}
        bias = g.sum(1)
    elif _input_gram_is_cheaper(module, calls, samples):
        a, g = calls[0][0].to(dtype), calls[0][1].to(dtype)
        pieces = {"weight": _Conv1dGram(module, a, g, scale)}
        bias = g.sum(2)
    else:
        factors = [_layer_factors(module, a.to(dtype), g.to(dtype)) for a, g in calls]
        a = _positions([a for a, _ in factors], samples)
        g = _columns([g for _, g in factors], samples)
        pieces = {"weight": _Factors(g, a, scale, partial(_weight_matrix, module))}
        bias = g.sum(2)
    if module.bias is not None:
        pieces["bias"] = _Rows(bias * scale)
    return {name: pieces[name] for name in named}


def check_means(
    pieces: list[tuple[nn.Parameter, SampleGradients]], grads: dict[int, Tensor]
) -> None:
    """``UnsupportedModel`` unless the sample gradients average to the batch gradient.

    Checked where it is cheap (per-row and embedding gradients; ``grads`` maps
    ``id(param)`` to its batch gradient): it catches a layer whose input had no
    batch dimension but a first size equal to the batch's.
    """
    for p, sample in pieces:
        if not isinstance(sample, _Rows | _EmbeddingRows):
            continue
        mean = sample.mean().reshape(-1)
        expected = grads[id(p)].reshape(-1).to(mean.dtype)
        tolerance = 1e-3 * float(expected.abs().max()) + 1e-12
        if not torch.allclose(mean, expected, rtol=1e-3, atol=tolerance):
            raise UnsupportedModel("sample gradients do not average to the batch gradient")
