"""Convex logistic regression on sparse, text-like features.

Documents are bags of words: word frequencies follow a Zipf law, each class tilts
them by its own random log-factors (``class_separation`` sets how far), document
lengths are Poisson. Counts become sublinear tf-idf features with L2-normalised
rows (scikit-learn's ``TfidfTransformer``, fitted on the training split), so most
entries are zero and the rest are small and heavy-tailed, as with real text.
The model is linear, so the loss is convex in the parameters: the problem the
tests of classical (convex) methods use.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from largebatch.tasks.base import Task
from largebatch.tasks.data import (
    check_num_classes,
    check_positive_ints,
    check_seed,
    classification_task,
    tensor_dataset,
)
from largebatch.utils.errors import ConfigError


def word_distributions(
    num_features: int,
    num_classes: int,
    zipf_exponent: float,
    class_separation: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``(num_classes, num_features)`` word probabilities: Zipf base, per-class log-tilt."""
    zipf = np.arange(1, num_features + 1, dtype=np.float64) ** -zipf_exponent
    tilt = np.exp(class_separation * rng.standard_normal((num_classes, num_features)))
    weights = zipf * tilt
    return weights / weights.sum(axis=1, keepdims=True)


def bag_of_words(
    labels: np.ndarray, word_probs: np.ndarray, doc_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Word counts per document: Poisson length (at least one word), class word distribution."""
    lengths = np.maximum(rng.poisson(doc_length, size=len(labels)), 1)
    return rng.multinomial(lengths, word_probs[labels])


def logreg(
    num_train: int = 4_000,
    num_test: int = 1_000,
    num_features: int = 1_000,
    num_classes: int = 2,
    doc_length: float = 40.0,
    zipf_exponent: float = 1.1,
    class_separation: float = 0.5,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Sparse tf-idf bag-of-words classification with a linear model (multinomial logistic regression)."""
    from sklearn.feature_extraction.text import TfidfTransformer

    check_positive_ints(num_train=num_train, num_test=num_test, num_features=num_features)
    check_num_classes(num_classes)
    if not doc_length > 0:
        raise ConfigError(f"Invalid doc_length: {doc_length} (expected > 0)")
    if not zipf_exponent >= 0:
        raise ConfigError(f"Invalid zipf_exponent: {zipf_exponent} (expected >= 0)")
    if not class_separation >= 0:
        raise ConfigError(f"Invalid class_separation: {class_separation} (expected >= 0)")
    check_seed(seed)

    rng = np.random.default_rng(seed)
    word_probs = word_distributions(num_features, num_classes, zipf_exponent, class_separation, rng)
    labels = rng.integers(num_classes, size=num_train + num_test)
    counts = bag_of_words(labels, word_probs, doc_length, rng)
    tfidf = TfidfTransformer(sublinear_tf=True).fit(counts[:num_train])
    features = tfidf.transform(counts).toarray()

    return classification_task(
        "logreg",
        train=tensor_dataset(features[:num_train], labels[:num_train]),
        test=tensor_dataset(features[num_train:], labels[num_train:]),
        build_model=lambda: nn.Linear(num_features, num_classes),
        target_accuracy=0.85,
        val_fraction=val_fraction,
        val_seed=seed,
    )
