"""What each built-in data set promises, checked against independent derivations."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch.nn import functional as F

from largebatch.tasks import get_task
from largebatch.tasks.data import split_rows
from largebatch.tasks.mnist1d import MNIST1DConvNet
from largebatch.tasks.modadd import CausalSelfAttention


def all_rows(task):
    splits = [task.train, task.test] + ([task.val] if task.val is not None else [])
    inputs = torch.cat([s.tensors[0] for s in splits])
    targets = torch.cat([s.tensors[1] for s in splits])
    return inputs, targets


def sorted_rows(inputs, targets):
    return sorted(zip(inputs.reshape(len(targets), -1).tolist(), targets.tolist()))


def test_mnist1d_cnn_is_the_small_three_conv_network():
    model = MNIST1DConvNet()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 3
    assert sum(p.numel() for p in model.parameters()) == 5210  # "about 5k parameters"


def test_digits_are_sklearns_bundled_digits_scaled_to_unit_range():
    task = get_task("digits-cnn")
    inputs, targets = all_rows(task)
    reference = load_digits()
    assert len(targets) == len(reference.target) == 1797
    assert sorted_rows(inputs.numpy(), targets.numpy()) == sorted_rows(
        (reference.images / 16.0).astype(np.float32), reference.target
    )
    test_counts = torch.bincount(task.test.tensors[1], minlength=10)
    expected = np.bincount(reference.target) * 0.2
    assert np.allclose(test_counts.numpy(), expected, atol=1.0)  # stratified


def test_teacher_student_label_noise_replaces_that_fraction_of_training_labels():
    options = {"num_train": 4000, "num_test": 500, "val_fraction": 0.0, "num_classes": 5}
    clean = get_task("teacher-student", **options)
    noisy = get_task("teacher-student", **options, label_noise=0.4)
    assert torch.equal(clean.train.tensors[0], noisy.train.tensors[0])
    assert torch.equal(clean.test.tensors[1], noisy.test.tensors[1])  # test labels stay clean
    changed = (clean.train.tensors[1] != noisy.train.tensors[1]).float().mean().item()
    # each label is redrawn with probability 0.4, uniformly over 5 classes
    assert changed == pytest.approx(0.4 * (1 - 1 / 5), abs=0.03)


def test_teacher_student_classes_are_all_used_and_roughly_balanced():
    labels = get_task("teacher-student", num_train=5000, num_test=10).train.tensors[1]
    shares = torch.bincount(labels, minlength=10).float() / len(labels)
    assert shares.min() > 0.02 and shares.max() < 0.3


def test_logreg_features_are_sparse_tfidf_with_zipf_word_frequencies():
    task = get_task("logreg", num_train=2000, num_test=200, num_features=500)
    inputs = task.train.tensors[0]
    assert (inputs >= 0).all()
    assert (inputs == 0).float().mean() > 0.9
    assert torch.allclose(inputs.norm(dim=1), torch.ones(len(inputs)), atol=1e-5)
    document_frequency = (inputs > 0).sum(dim=0).numpy()
    rank_correlation = spearmanr(np.arange(500), document_frequency).statistic
    assert rank_correlation < -0.8
    assert isinstance(task.build_model(), torch.nn.Linear)  # linear model: a convex loss


def test_modadd_covers_every_pair_once_with_the_right_answers():
    modulus = 23
    task = get_task("modadd-transformer", modulus=modulus, train_fraction=0.4, d_model=16)
    inputs, targets = all_rows(task)
    a, b, equals = inputs.T
    assert torch.equal(targets, (a + b) % modulus)
    assert (equals == modulus).all()
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    assert len(pairs) == len(targets) == modulus**2
    assert len(task.train) + len(task.val) == round(0.4 * modulus**2)


def test_causal_attention_matches_torch_reference_and_has_hessian_vector_products():
    torch.manual_seed(0)
    attention = CausalSelfAttention(d_model=8, n_heads=2)
    x = torch.randn(4, 3, 8, requires_grad=True)
    q, k, v = attention.qkv(x).view(4, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    reference = attention.out(reference.transpose(1, 2).reshape(4, 3, 8))
    assert torch.allclose(attention(x), reference, atol=1e-6)

    (grad,) = torch.autograd.grad(attention(x).pow(2).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, x, grad_outputs=torch.ones_like(grad))
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


def test_modadd_prediction_depends_on_the_operands_and_attention_is_causal():
    task = get_task("modadd-transformer", modulus=11, d_model=16, n_heads=2)
    torch.manual_seed(0)
    model = task.build_model()
    tokens = task.train.tensors[0][:5]
    changed_a = tokens.clone()
    changed_a[:, 0] = (changed_a[:, 0] + 1) % 11
    assert not torch.allclose(model(tokens), model(changed_a))  # the answer depends on a
    hidden = model.token_embedding(tokens) + model.position_embedding(torch.arange(3))
    changed_later = hidden.clone()
    changed_later[:, 1:] += 1.0
    first = model.blocks[0].attn(hidden)[:, 0]
    assert torch.allclose(first, model.blocks[0].attn(changed_later)[:, 0])  # causal


def test_split_rows_refuses_to_leave_nothing():
    with pytest.raises(ValueError, match="nothing left"):
        split_rows(torch.zeros(4, 1), torch.zeros(4), [0.5, 0.5], seed=0)
