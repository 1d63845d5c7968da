"""The fused path of LARS, LAMB and ALTO: multi-tensor Triton kernels, one launch per pass.

A group's step runs in a few launches whatever its number of tensors, as NVIDIA apex's
``FusedLAMB``: LAMB and ALTO take one pass for E, the moments, the update direction
``r`` and each chunk's sums of ``w^2`` and ``r^2``; one small launch turning those
partial sums into per-tensor norms; the trust ratios from the shared
:mod:`~largebatch.optim.trust_ratio` functions (element-wise torch ops on the vector of
norms); and one pass moving the parameters. A group without trust ratio takes one pass
in all. LARS takes its norms from :func:`~largebatch.optim.trust_ratio.norms` (one
``_foreach_norm`` per list on GPU) and one pass for the update.

How one launch covers a group: a :class:`TensorTable` in device memory holds each
tensor's address in each list (parameters, gradients, state) and its size, and splits
the tensors into chunks of :data:`CHUNK_SIZE` elements; program ``i`` of a launch
handles chunk ``i`` (kernels in :mod:`largebatch.optim._fused_kernels`). Tables are
cached by the tensors' addresses and sizes, so a step whose tensors sit where they sat
before copies nothing to the device (parameters and state never move; gradients freed
by ``zero_grad(set_to_none=True)`` tend to get the same blocks from the caching
allocator, so their addresses repeat). A new table goes
through pinned memory without blocking. Nothing in a step reads a device value on the
host: step counts, bias corrections, norms and ratios stay on the device.

The path runs on CUDA tensors of dtype float32, float16 or bfloat16 whose lists share
the parameters' dtype and memory layout; when every address is 16-byte aligned (what
the caching allocator returns, unlike some views into flat buffers) the kernels use
16-byte loads and stores. :func:`group_table` says why a group does not qualify;
the automatic choice then takes the multi-tensor path. For tests and
debugging, ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors through
Triton's interpreter (requested with ``fused=True``; never chosen automatically).
"""

from __future__ import annotations

import functools
import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

CHUNK_SIZE = 16384
"""Elements one program handles (a multiple of :data:`BLOCK_SIZE`; not tuned on a GPU)."""

BLOCK_SIZE = 1024
"""Elements one program processes at a time (a multiple of 16)."""

NORM_BLOCK_SIZE = 256
"""Partial sums the norm kernel adds at a time (even: two interleaved sums)."""

TABLE_CACHE_SIZE = 64
"""Address tables kept per process (8 bytes per tensor and list, 16 per chunk, each)."""

AUTOMATIC_DEVICE_TYPES = ("cuda",)
"""Device types whose supported groups take the fused path by default (elsewhere it is
slower than or not measured against the others: on CPU only Triton's interpreter runs it).
ROCm builds, whose devices are also ``cuda``, are left out: untried there."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ALIGNMENT = 16


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (the ``triton`` extra, or torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def chosen_by_default(device: torch.device) -> bool:
    """Whether groups on ``device`` take the fused path when no switch asks for a path."""
    return device.type in AUTOMATIC_DEVICE_TYPES and not (
        device.type == "cuda" and torch.version.hip is not None
    )


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter.

    That takes ``TRITON_INTERPRET=1`` before Triton is first imported (by anything:
    ``torch._dynamo`` imports it), so that Triton's own library is interpreted too.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction) and isinstance(
        kernels().lars_kernel, InterpretedFunction
    )


def kernels() -> ModuleType:
    """The kernel module (imports Triton on first use)."""
    from largebatch.optim import _fused_kernels

    return _fused_kernels


def device_context(device: torch.device) -> AbstractContextManager:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@dataclass(frozen=True)
class TensorTable:
    """A group's tensors as a multi-tensor kernel sees them (views of one device buffer).

    Attributes:
        addresses: per list, the int64 address of each tensor's first element.
        numels: each tensor's number of elements.
        chunk_tensors, chunk_starts: per chunk, its tensor and first element.
        first_chunks: per tensor, the index of its first chunk, then the chunk count.
        chunks: the number of chunks (a launch's grid).
        contiguous: every tensor was contiguous when the table was built.
        aligned: every address is a multiple of 16 bytes (the kernels then load and
            store 16 bytes per instruction; views into flat buffers may not be).
    """

    addresses: tuple[Tensor, ...]
    numels: Tensor
    chunk_tensors: Tensor
    chunk_starts: Tensor
    first_chunks: Tensor
    chunks: int
    contiguous: bool
    aligned: bool


_TABLES: OrderedDict[tuple, TensorTable] = OrderedDict()


def group_table(tensor_lists: Sequence[Sequence[Tensor]]) -> TensorTable | str:
    """The table of one device/dtype group's parallel lists, or why the fused path cannot run.

    ``tensor_lists`` holds the parameters, then the gradients, then state buffers.

    A table is built, after checking dtypes, alignment and layouts, the first time a set
    of addresses and sizes is seen, then taken from the cache; on a cache hit only the
    gradients' layout is checked again (the one thing that may change at an address the
    cache has seen: state and parameters keep theirs, and torch keeps gradients to the
    parameters' dtype and shape; other layouts are checked in full every step). CPU
    tensors qualify only in Triton's interpreter.
    """
    if not triton_available():
        return "triton is not installed (pip install 'largebatch[triton]')"
    params = tensor_lists[0]
    device, dtype = params[0].device, params[0].dtype
    if device.type == "cpu":
        if not interpreting():
            return (
                "CPU tensors need Triton's interpreter "
                "(TRITON_INTERPRET=1 before anything imports triton)"
            )
    elif device.type != "cuda":
        return f"tensors on {device.type}, not CUDA"
    if dtype not in _DTYPES:
        return f"dtype {dtype}; the fused kernels take float32, float16 or bfloat16"
    addresses = [list(map(Tensor.data_ptr, tensors)) for tensors in tensor_lists]
    numels = list(map(Tensor.numel, params))
    key = (device, CHUNK_SIZE, *map(tuple, addresses), tuple(numels))
    table = _TABLES.get(key)
    if table is not None and table.contiguous and all(map(Tensor.is_contiguous, tensor_lists[1])):
        _TABLES.move_to_end(key)
        return table
    every = [t for tensors in tensor_lists for t in tensors]
    if any(t.numel() != p.numel() for tensors in tensor_lists[1:] for t, p in zip(tensors, params)):
        return "a gradient or state tensor's size differs from its parameter's"
    if any(t.dtype != dtype for t in every):
        return f"the state or gradients are not all of the parameters' dtype {dtype}"
    contiguous = all(map(Tensor.is_contiguous, every))
    if not contiguous and not _same_dense_layouts(tensor_lists):
        return _LAYOUT
    aligned = not any(address % _ALIGNMENT for row in addresses for address in row)
    table = _build_table(device, addresses, numels, contiguous, aligned)
    _TABLES[key] = table
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


_LAYOUT = "a parameter's gradient or state has another memory layout, or is not dense"


def _same_dense_layouts(tensor_lists: Sequence[Sequence[Tensor]]) -> bool:
    """Every tensor has its parameter's shape and strides, which leave no gaps or overlaps."""
    return all(
        _dense(tensors[0])
        and all(t.shape == tensors[0].shape and t.stride() == tensors[0].stride() for t in tensors)
        for tensors in zip(*tensor_lists)
    )


def _dense(tensor: Tensor) -> bool:
    """The elements fill ``numel`` consecutive slots (any dimension order: channels-last too)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _build_table(
    device: torch.device,
    addresses: list[list[int]],
    numels: list[int],
    contiguous: bool,
    aligned: bool,
) -> TensorTable:
    chunk_tensors, chunk_starts, first_chunks = [], [], [0]
    for index, numel in enumerate(numels):
        starts = range(0, numel, CHUNK_SIZE)
        chunk_tensors += [index] * len(starts)
        chunk_starts += starts
        first_chunks.append(len(chunk_starts))
    sections = [*addresses, numels, chunk_tensors, chunk_starts, first_chunks]
    # each section padded to 16 bytes, so every view is aligned as Triton's fast path wants
    padded = [values + [0] * (len(values) % 2) for values in sections]
    host = torch.tensor([value for values in padded for value in values], dtype=torch.int64)
    # pinned and non-blocking: the step does not wait for the copy
    buffer = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    views = [
        view[: len(values)]
        for view, values in zip(buffer.split([len(values) for values in padded]), sections)
    ]
    return TensorTable(
        addresses=tuple(views[: len(addresses)]),
        numels=views[-4],
        chunk_tensors=views[-3],
        chunk_starts=views[-2],
        first_chunks=views[-1],
        chunks=len(chunk_starts),
        contiguous=contiguous,
        aligned=aligned,
    )


def launch_constants(table: TensorTable, dtype: torch.dtype) -> dict:
    """The compile-time arguments every element-wise kernel takes, for a group of ``dtype``."""
    import triton.language as tl

    return {
        "DTYPE": getattr(tl, str(dtype).removeprefix("torch.")),  # tl.float32, tl.bfloat16, ...
        "ALIGNED": table.aligned,
        "CHUNK": CHUNK_SIZE,
        "BLOCK": BLOCK_SIZE,
    }


def segment_norms(table: TensorTable, partial_sums: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor norms ``(||w||, ||r||)`` from a pass's interleaved per-chunk sums of squares."""
    count = len(table.numels)
    norms = torch.empty(2, count + (-count) % 4, dtype=torch.float32, device=partial_sums.device)
    param_norms, update_norms = norms[0, :count], norms[1, :count]  # 16-byte aligned rows
    kernels().segment_norms_kernel[(count,)](
        partial_sums, table.first_chunks, param_norms, update_norms, BLOCK=NORM_BLOCK_SIZE
    )
    return param_norms, update_norms


def mark_modified(*tensor_lists: Sequence[Tensor]) -> None:
    """Bump the tensors' version counters, as an in-place torch op would (autograd's checks).

    Called for the parameters and an overwritten gradient: tensors an autograd graph may
    have saved. State buffers are left alone (one counter bump costs about as much host
    time as the check it serves).
    """
    torch.autograd.graph.increment_version([t for tensors in tensor_lists for t in tensors])
