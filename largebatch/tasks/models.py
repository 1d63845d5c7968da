"""Small models shared by several built-in tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Fully connected network ``in -> hidden[0] -> ... -> out`` with ``activation`` between layers."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
