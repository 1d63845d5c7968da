"""Trust-ratio formulas against plain-Python evaluations of the papers' definitions."""

import math

import pytest
import torch

from largebatch.optim.trust_ratio import (
    alto_trust_ratio,
    group_uses_trust_ratio,
    lamb_trust_ratio,
    lars_trust_ratio,
    norms,
    one_where_zero,
    scale_by_ratio_,
)

# (||w||, ||g||) pairs: generic values, a zero parameter, a zero gradient, both zero.
NORM_PAIRS = [(3.0, 0.5), (0.2, 7.0), (0.0, 2.0), (4.0, 0.0), (0.0, 0.0)]


def _vectors(pairs):
    w, g = zip(*pairs)
    return torch.tensor(w, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norms_are_per_tensor_l2_norms(dtype):
    """CPU float32/float64 take BLAS dot products, other dtypes ``_foreach_norm``."""
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, generator=generator).to(dtype),
        torch.randn(5, generator=generator).to(dtype),
        torch.zeros(2, 2, 2, dtype=dtype),
        torch.randn(4, 6, generator=generator).to(dtype).t(),  # not contiguous
        torch.empty(0, dtype=dtype),
        torch.randn(50_000, generator=generator).to(dtype),
    ]
    expected = [math.sqrt(sum(x * x for x in t.flatten().tolist())) for t in tensors]
    result = norms(tensors)
    assert result.dtype == dtype
    rel = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert result.double().tolist() == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("clip_lr", [None, 0.5, 1e-4])
def test_lars_ratio_matches_definition(clip_lr):
    coef, wd, eps = 1e-3, 5e-4, 1e-9
    w, g = _vectors(NORM_PAIRS)
    ratio = lars_trust_ratio(w, g, trust_coef=coef, weight_decay=wd, eps=eps, clip_lr=clip_lr)
    for (w_norm, g_norm), value in zip(NORM_PAIRS, ratio.tolist()):
        if w_norm == 0 or g_norm == 0:
            expected = 1.0
        else:
            expected = coef * w_norm / (g_norm + wd * w_norm + eps)
            if clip_lr is not None:  # LARC (apex): min(local_lr / lr, 1)
                expected = min(expected / clip_lr, 1.0)
        assert value == pytest.approx(expected, rel=1e-12)


def test_lars_clip_caps_the_effective_rate_at_lr():
    w, g = torch.tensor([10.0], dtype=torch.float64), torch.tensor([1e-3], dtype=torch.float64)
    lr = 0.1
    ratio = lars_trust_ratio(w, g, trust_coef=1.0, weight_decay=0.0, clip_lr=lr)
    assert (lr * ratio).item() == pytest.approx(lr)  # unclipped it would be lr * 1e4


@pytest.mark.parametrize("bounds", [(None, None), (0.0, 10.0), (1.0, 2.0)])
def test_lamb_ratio_matches_definition(bounds):
    low, high = bounds
    w, r = _vectors(NORM_PAIRS + [(25.0, 5.0)])
    ratio = lamb_trust_ratio(w, r, norm_min=low, norm_max=high)
    for (w_norm, r_norm), value in zip(NORM_PAIRS + [(25.0, 5.0)], ratio.tolist()):
        phi = w_norm if low is None else min(max(w_norm, low), high)
        expected = 1.0 if w_norm == 0 or r_norm == 0 else phi / r_norm
        assert value == pytest.approx(expected, rel=1e-12)


def test_alto_ratio_matches_paper_form():
    """The paper's form, and 1 where a norm is 0 (a zero tensor moves, as with LAMB)."""
    eps2, eps3 = 1e-6, 1e-10
    w, r = _vectors(NORM_PAIRS)
    ratio = alto_trust_ratio(w, r, eps2=eps2, eps3=eps3)
    for (w_norm, r_norm), value in zip(NORM_PAIRS, ratio.tolist()):
        phi = w_norm + eps3
        expected = 1.0 if w_norm == 0 or r_norm == 0 else phi / (r_norm + eps2 * phi)
        assert value == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(ratio).all() and ratio.max() <= (1 + 1e-12) / eps2


def test_scalar_and_vector_forms_agree():
    w, g = _vectors(NORM_PAIRS)
    vector = lars_trust_ratio(w, g, trust_coef=1e-3, weight_decay=1e-4)
    scalars = [lars_trust_ratio(a, b, trust_coef=1e-3, weight_decay=1e-4) for a, b in zip(w, g)]
    assert torch.equal(vector, torch.stack(scalars))


def test_one_where_zero_needs_every_norm_positive():
    ratio = torch.tensor([2.0, 3.0, 4.0])
    result = one_where_zero(ratio, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert result.tolist() == [2.0, 1.0, 1.0]


def test_scale_by_ratio_scales_each_tensor():
    updates = [torch.ones(2, 3), torch.ones(4)]
    scale_by_ratio_(updates, torch.tensor([2.0, 0.5]))
    assert updates[0].eq(2.0).all() and updates[1].eq(0.5).all()


def test_group_switch_defaults_to_on():
    assert group_uses_trust_ratio({}) is True
    assert group_uses_trust_ratio({"trust_ratio": False}) is False
