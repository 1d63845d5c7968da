"""Split a model's parameters into groups by two independent switches.

"No weight decay" and "no trust ratio" are decided per parameter by a predicate.
The default rule for both is the usual one: parameters with one dimension
(biases, normalisation weights) are exempt. Names are never matched by substring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ParamPredicate = Callable[[str, nn.Parameter], bool]


def is_one_dimensional(name: str, param: nn.Parameter) -> bool:
    """Default exemption rule: biases and normalisation weights (``ndim <= 1``)."""
    return param.ndim <= 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layerwise: bool = False,
    no_weight_decay: ParamPredicate | None = is_one_dimensional,
    no_trust_ratio: ParamPredicate | None = is_one_dimensional,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` optimizers.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: the decay of parameters that are not exempt.
        layerwise: also set the per-group ``trust_ratio`` flag that layer-wise
            optimizers (LARS, LAMB, ALTO) honour; otherwise the key is omitted.
        no_weight_decay: ``(name, param) -> bool``; True exempts from decay.
            ``None`` exempts nothing.
        no_trust_ratio: ``(name, param) -> bool``; True exempts from the trust ratio.
            ``None`` exempts nothing.

    Returns:
        At most four non-empty groups, one per combination of the two switches,
        in a deterministic order (the order parameters appear in the model).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (no_weight_decay is not None and no_weight_decay(name, param))
        trust = layerwise and not (no_trust_ratio is not None and no_trust_ratio(name, param))
        groups.setdefault((decay, trust), []).append(param)

    result = []
    for (decay, trust), params in groups.items():
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if layerwise:
            group["trust_ratio"] = trust
        result.append(group)
    return result
