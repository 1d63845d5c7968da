"""Modular addition ``a + b mod p`` with a small decoder-only transformer.

Every pair ``(a, b)`` is one example: the token sequence ``a b =`` (``=`` is token
``p``) and the answer ``(a + b) mod p`` as the class to predict from the last
position. A seeded ``train_fraction`` of the ``p**2`` pairs is the training set,
the rest is the test set. Inputs are int64 token ids, shape ``(n, 3)``.

Attention is written with plain matrix products rather than
``F.scaled_dot_product_attention``: the fused CPU kernel has no double backward,
and second-order optimizers and curvature diagnostics need Hessian-vector products.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from largebatch.tasks.base import Task
from largebatch.tasks.data import (
    check_fraction,
    check_positive_int,
    check_positive_ints,
    check_seed,
    classification_task,
    split_rows,
)
from largebatch.utils.errors import ConfigError

SEQUENCE_LENGTH = 3  # a, b, "="


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier ones."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_dim = width // self.n_heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x-wide GELU MLP, both residual."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ModAddTransformer(nn.Module):
    """Token and position embeddings, ``n_layers`` blocks, logits over ``modulus`` answers."""

    def __init__(self, modulus: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.token_embedding = nn.Embedding(modulus + 1, d_model)  # +1 for "="
        self.position_embedding = nn.Embedding(SEQUENCE_LENGTH, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, modulus)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        x = self.final_norm(self.blocks(x))
        return self.head(x[:, -1])


def modular_addition_data(modulus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``modulus**2`` sequences ``a b =`` and their answers ``(a + b) mod modulus``."""
    a, b = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus)).T
    equals = torch.full_like(a, modulus)
    return torch.stack([a, b, equals], dim=1), (a + b) % modulus


def modadd_transformer(
    modulus: int = 97,
    train_fraction: float = 0.5,
    val_fraction: float = 0.1,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seed: int = 0,
) -> Task:
    """``a + b mod modulus`` from ``train_fraction`` of all pairs, decoder-only transformer."""
    check_positive_int("modulus", modulus)
    if modulus < 2:
        raise ConfigError(f"Invalid modulus: {modulus} (expected at least 2)")
    check_fraction("train_fraction", train_fraction)
    check_positive_ints(d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    if d_model % n_heads:
        raise ConfigError(f"Invalid n_heads: {n_heads} (must divide d_model={d_model})")
    check_seed(seed)

    tokens, answers = modular_addition_data(modulus)
    test, train = split_rows(tokens, answers, [train_fraction], seed)
    return classification_task(
        "modadd-transformer",
        train=train,
        test=test,
        build_model=lambda: ModAddTransformer(modulus, d_model, n_layers, n_heads),
        target_accuracy=0.95,
        val_fraction=val_fraction,
        val_seed=seed + 1,
    )
