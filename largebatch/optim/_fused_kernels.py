"""Triton kernels of the fused path (imported only when that path runs; see :mod:`._fused`).

Every element-wise kernel is *multi-tensor*: program ``i`` of a launch handles chunk
``i`` of the group, a run of at most ``CHUNK`` elements of one tensor, found through
the chunk table (``chunk_tensors[i]``, ``chunk_starts[i]``); each tensor's address in
each list comes from an address table (one row per list), its size from ``numels``.
Elements are loaded in the parameters' dtype, computed in float32 and stored back in
that dtype. A chunk runs its full blocks without masks and its tail, if any, masked;
when every address is 16-byte aligned (``ALIGNED``, what the caching allocator returns)
the full blocks load and store 16 bytes per instruction.

The arithmetic follows the multi-tensor (``torch._foreach_*``) path operation for
operation, with IEEE-rounded square roots and divisions (``sqrt_rn``, ``div_rn``), so
the two paths agree to rounding (float32: a few units in the last place per step).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _address(addresses, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element 0 of ``tensor`` in one list; ``ALIGNED``: 16-byte aligned (vector loads)."""
    pointer = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _chunk(chunk_tensors, chunk_starts, numels, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor, first element, end of its full blocks, and end."""
    tensor = tl.load(chunk_tensors + tl.program_id(0))
    start = tl.multiple_of(tl.load(chunk_starts + tl.program_id(0)), BLOCK)
    end = tl.minimum(start + CHUNK, tl.load(numels + tensor))
    full_end = start + (end - start) // BLOCK * BLOCK
    return tensor, start, full_end, end


@triton.jit
def _load(pointer, offsets, end, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(pointer + offsets, mask=offsets < end, other=0.0).to(tl.float32)
    return tl.load(pointer + offsets).to(tl.float32)


@triton.jit
def _store(pointer, offsets, end, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty), mask=offsets < end)
    else:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty))


# --- Adam's direction (LAMB, ALTO) ------------------------------------------------------------


@triton.jit
def _direction(w, m, v, scale, eps_hat, weight_decay):
    """``r = (1 / (sqrt(v) + eps_hat)) * m * scale + weight_decay * w`` (``adam_directions``)."""
    return tl.div_rn(1.0, tl.sqrt_rn(v) + eps_hat) * m * scale + weight_decay * w


@triton.jit
def _adam_block(
    offsets,
    end,
    w_ptr,
    g_ptr,
    mu_ptr,
    m_ptr,
    v_ptr,
    scale,
    eps_hat,
    neg_lr,
    m_weight,
    beta2,
    v_weight,
    weight_decay,
    e_coefficient,
    e_weight,
    HAS_E: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    OVERWRITE_GRAD: tl.constexpr,
    APPLY: tl.constexpr,
    MASKED: tl.constexpr,
):
    """E, the moments and ``r`` on one block; ``w`` moved (``APPLY``) or ``w^2, r^2`` returned."""
    g = _load(g_ptr, offsets, end, MASKED)
    if MAXIMIZE:
        g = -g
    if HAS_E:
        mu = _load(mu_ptr, offsets, end, MASKED)
        difference = g - mu
        g = g + e_coefficient * difference
        _store(mu_ptr, offsets, end, mu + e_weight * difference, MASKED)
    m = _load(m_ptr, offsets, end, MASKED)
    m = m + m_weight * (g - m)
    v = _load(v_ptr, offsets, end, MASKED) * beta2 + v_weight * g * g
    _store(m_ptr, offsets, end, m, MASKED)
    _store(v_ptr, offsets, end, v, MASKED)
    w = _load(w_ptr, offsets, end, MASKED)
    r = _direction(w, m, v, scale, eps_hat, weight_decay)
    if OVERWRITE_GRAD:
        _store(g_ptr, offsets, end, r, MASKED)
    if APPLY:
        _store(w_ptr, offsets, end, w + neg_lr * r, MASKED)
    if MASKED:
        r = tl.where(offsets < end, r, 0.0)
    return w * w, r * r


@triton.jit
def adam_direction_kernel(
    w_addresses,
    g_addresses,
    mu_addresses,
    m_addresses,
    v_addresses,
    numels,
    chunk_tensors,
    chunk_starts,
    scales,
    eps_hats,
    partial_sums,
    neg_lr,
    m_weight,
    beta2,
    v_weight,
    weight_decay,
    e_coefficient,
    e_weight,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_E: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    OVERWRITE_GRAD: tl.constexpr,
    APPLY: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass per chunk: E (``HAS_E``), Adam's moments, ``r``.

    ``APPLY`` (no trust ratio): ``w += neg_lr * r`` in the same pass. Otherwise the
    chunk's sums of ``w^2`` and ``r^2`` go to ``partial_sums[2 i]``, ``[2 i + 1]``.
    ``OVERWRITE_GRAD``: ``r`` is stored into the gradient.
    """
    tensor, start, full_end, end = _chunk(chunk_tensors, chunk_starts, numels, CHUNK, BLOCK)
    w_ptr = _address(w_addresses, tensor, DTYPE, ALIGNED)
    g_ptr = _address(g_addresses, tensor, DTYPE, ALIGNED)
    mu_ptr = _address(mu_addresses, tensor, DTYPE, ALIGNED)
    m_ptr = _address(m_addresses, tensor, DTYPE, ALIGNED)
    v_ptr = _address(v_addresses, tensor, DTYPE, ALIGNED)
    scale = tl.load(scales + tensor)
    eps_hat = tl.load(eps_hats + tensor)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    r_sq = tl.zeros([BLOCK], dtype=tl.float32)
    lanes = tl.arange(0, BLOCK)
    for offset in range(start, full_end, BLOCK):
        w2, r2 = _adam_block(
            offset + lanes, end, w_ptr, g_ptr, mu_ptr, m_ptr, v_ptr, scale, eps_hat, neg_lr,
            m_weight, beta2, v_weight, weight_decay, e_coefficient, e_weight,
            HAS_E, MAXIMIZE, OVERWRITE_GRAD, APPLY, False,
        )  # fmt: skip
        w_sq += w2
        r_sq += r2
    if full_end < end:
        w2, r2 = _adam_block(
            full_end + lanes, end, w_ptr, g_ptr, mu_ptr, m_ptr, v_ptr, scale, eps_hat, neg_lr,
            m_weight, beta2, v_weight, weight_decay, e_coefficient, e_weight,
            HAS_E, MAXIMIZE, OVERWRITE_GRAD, APPLY, True,
        )  # fmt: skip
        w_sq += w2
        r_sq += r2
    if not APPLY:
        tl.store(partial_sums + 2 * tl.program_id(0), tl.sum(w_sq, axis=0))
        tl.store(partial_sums + 2 * tl.program_id(0) + 1, tl.sum(r_sq, axis=0))


@triton.jit
def _apply_block(
    offsets,
    end,
    w_ptr,
    r_ptr,
    m_ptr,
    v_ptr,
    coefficient,
    scale,
    eps_hat,
    weight_decay,
    R_IN_GRAD: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = _load(w_ptr, offsets, end, MASKED)
    if R_IN_GRAD:
        r = _load(r_ptr, offsets, end, MASKED)
    else:
        m = _load(m_ptr, offsets, end, MASKED)
        v = _load(v_ptr, offsets, end, MASKED)
        r = _direction(w, m, v, scale, eps_hat, weight_decay)
    _store(w_ptr, offsets, end, w + coefficient * r, MASKED)


@triton.jit
def apply_direction_kernel(
    w_addresses,
    g_addresses,
    m_addresses,
    v_addresses,
    numels,
    chunk_tensors,
    chunk_starts,
    scales,
    eps_hats,
    coefficients,
    weight_decay,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    R_IN_GRAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``w += coefficients[tensor] * r``; ``r`` read from the gradient (``R_IN_GRAD``) or
    evaluated again from the new moments (as :func:`adam_direction_kernel` did)."""
    tensor, start, full_end, end = _chunk(chunk_tensors, chunk_starts, numels, CHUNK, BLOCK)
    w_ptr = _address(w_addresses, tensor, DTYPE, ALIGNED)
    r_ptr = _address(g_addresses, tensor, DTYPE, ALIGNED)
    m_ptr = _address(m_addresses, tensor, DTYPE, ALIGNED)
    v_ptr = _address(v_addresses, tensor, DTYPE, ALIGNED)
    coefficient = tl.load(coefficients + tensor)
    scale = tl.load(scales + tensor)
    eps_hat = tl.load(eps_hats + tensor)
    lanes = tl.arange(0, BLOCK)
    for offset in range(start, full_end, BLOCK):
        _apply_block(
            offset + lanes, end, w_ptr, r_ptr, m_ptr, v_ptr, coefficient, scale, eps_hat,
            weight_decay, R_IN_GRAD, False,
        )  # fmt: skip
    if full_end < end:
        _apply_block(
            full_end + lanes, end, w_ptr, r_ptr, m_ptr, v_ptr, coefficient, scale, eps_hat,
            weight_decay, R_IN_GRAD, True,
        )  # fmt: skip


@triton.jit
def segment_norms_kernel(
    partial_sums, first_chunks, param_norms, update_norms, BLOCK: tl.constexpr
):
    """Per tensor ``t``, the square roots of the sums over its chunks ``i`` of
    ``partial_sums[2 i]`` (into ``param_norms[t]``) and ``partial_sums[2 i + 1]``
    (``update_norms[t]``).

    One program per tensor, adding in a fixed order: the norms are deterministic.
    """
    tensor = tl.program_id(0)
    low = 2 * tl.load(first_chunks + tensor)
    high = 2 * tl.load(first_chunks + tensor + 1)
    lanes = tl.arange(0, BLOCK)
    sums = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(low, high, BLOCK):
        sums += tl.load(partial_sums + offset + lanes, mask=offset + lanes < high, other=0.0)
    even = lanes % 2 == 0
    tl.store(param_norms + tensor, tl.sqrt_rn(tl.sum(tl.where(even, sums, 0.0), axis=0)))
    tl.store(update_norms + tensor, tl.sqrt_rn(tl.sum(tl.where(even, 0.0, sums), axis=0)))


# --- LARS -------------------------------------------------------------------------------------


@triton.jit
def _lars_block(
    offsets,
    end,
    w_ptr,
    g_ptr,
    buf_ptr,
    ratio,
    neg_lr,
    momentum,
    weight_decay,
    HAS_RATIO: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    MASKED: tl.constexpr,
):
    g = _load(g_ptr, offsets, end, MASKED)
    if MAXIMIZE:
        g = -g
    w = _load(w_ptr, offsets, end, MASKED)
    update = g + weight_decay * w
    if HAS_RATIO:
        update = update * ratio
    buf = _load(buf_ptr, offsets, end, MASKED) * momentum + update
    _store(buf_ptr, offsets, end, buf, MASKED)
    update = update + momentum * buf if NESTEROV else buf
    _store(w_ptr, offsets, end, w + neg_lr * update, MASKED)


@triton.jit
def lars_kernel(
    w_addresses,
    g_addresses,
    buf_addresses,
    numels,
    chunk_tensors,
    chunk_starts,
    ratios,
    neg_lr,
    momentum,
    weight_decay,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_RATIO: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """LARS's update in one pass: ``u = ratio (g + wd w)``, ``buf = momentum buf + u``, ``w -= lr step``."""
    tensor, start, full_end, end = _chunk(chunk_tensors, chunk_starts, numels, CHUNK, BLOCK)
    w_ptr = _address(w_addresses, tensor, DTYPE, ALIGNED)
    g_ptr = _address(g_addresses, tensor, DTYPE, ALIGNED)
    buf_ptr = _address(buf_addresses, tensor, DTYPE, ALIGNED)
    ratio = 1.0
    if HAS_RATIO:
        ratio = tl.load(ratios + tensor)
    lanes = tl.arange(0, BLOCK)
    for offset in range(start, full_end, BLOCK):
        _lars_block(
            offset + lanes, end, w_ptr, g_ptr, buf_ptr, ratio, neg_lr, momentum, weight_decay,
            HAS_RATIO, NESTEROV, MAXIMIZE, False,
        )  # fmt: skip
    if full_end < end:
        _lars_block(
            full_end + lanes, end, w_ptr, g_ptr, buf_ptr, ratio, neg_lr, momentum, weight_decay,
            HAS_RATIO, NESTEROV, MAXIMIZE, True,
        )  # fmt: skip
