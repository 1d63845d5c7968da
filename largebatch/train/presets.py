"""Published large-batch recipes as named sets of :class:`RunConfig` values.

A preset fills in the optimizer, learning rate, scaling rule and schedule of a
recipe; whatever the user sets explicitly wins, and the task, batch size and
budget stay the user's. Some values depend on those (Goyal et al.'s warm-up
starts from the small-batch rate, Shacklett et al.'s lasts 1 % of the run), so a
preset is applied to the values of the config being built::

    values = {"task": "mnist1d-cnn", "batch_size": 4096, "epochs": 30}
    config = RunConfig(**apply_preset("goyal", values))

``largebatch run --preset NAME`` does the same, and ``largebatch list presets``
shows each with its source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from largebatch.train.config import DEFAULT_EPOCHS, RunConfig
from largebatch.utils.errors import UnknownNameError, unknown_name_message


@dataclass(frozen=True)
class Preset:
    """A recipe: fixed ``values`` and ``derived`` ones, computed from the config being built."""

    name: str
    description: str
    reference: str
    values: Mapping[str, Any]
    derived: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda values: {})

    def apply(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (the fields set explicitly) with this recipe filled in around them.

        Explicit values win. The recipe's optimizer options are merged under the
        explicit ones, and dropped if another optimizer is chosen; an explicit
        warm-up (in steps or epochs) replaces the recipe's.
        """
        merged = {**_defaults(), **self.values, **values}
        result = {**self.values, **self.derived(merged), **values}
        given = dict(values.get("optimizer_options") or {})
        if result["optimizer"] == self.values.get("optimizer"):
            result["optimizer_options"] = {**self.values.get("optimizer_options", {}), **given}
        elif "optimizer_options" in values:
            result["optimizer_options"] = given
        else:
            result.pop("optimizer_options", None)
        if {"warmup_steps", "warmup_epochs"} & values.keys():
            result["warmup_steps"] = values.get("warmup_steps")
            result["warmup_epochs"] = values.get("warmup_epochs")
        return result


def _defaults() -> dict[str, Any]:
    return RunConfig().to_dict()


def _goyal_warmup(values: dict[str, Any]) -> dict[str, Any]:
    """Gradual warm-up from the base-batch rate (1/k of the peak), none if k <= 1."""
    ratio = values["base_batch_size"] / values["batch_size"]
    return {"warmup_start": ratio} if ratio < 1 else {"warmup_epochs": 0.0}


def _one_percent_warmup(values: dict[str, Any]) -> dict[str, Any]:
    """Warm-up over 1 % of the run (in the budget's own unit); no down-scaling below 256."""
    derived: dict[str, Any] = {}
    if values.get("steps") is not None:
        derived["warmup_steps"] = round(0.01 * values["steps"])
    elif values.get("examples") is not None:
        derived["warmup_steps"] = round(0.01 * values["examples"] / values["batch_size"])
    else:
        epochs = values["epochs"] if values.get("epochs") is not None else DEFAULT_EPOCHS
        derived["warmup_epochs"] = 0.01 * epochs
    if values["batch_size"] < values["base_batch_size"]:
        derived["scaling"] = "none"  # their scale is max(1, sqrt(B / 256))
    return derived


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="goyal",
            description=(
                "SGD with momentum 0.9 and weight decay 1e-4, lr 0.1 per 256 examples scaled "
                "linearly, gradual warm-up over 5 epochs from the small-batch rate, then the "
                "rate x0.1 at epochs 30, 60 and 80 of 90 (as fractions of the run)"
            ),
            reference=(
                "Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour "
                "(arXiv 1706.02677)"
            ),
            values={
                "optimizer": "sgd",
                "optimizer_options": {"momentum": 0.9, "weight_decay": 1e-4},
                "lr": 0.1,
                "base_batch_size": 256,
                "scaling": "linear",
                "warmup_epochs": 5.0,
                "schedule": "step",
                "decay_milestones": (30 / 90, 60 / 90, 80 / 90),
                "decay_gamma": 0.1,
            },
            derived=_goyal_warmup,
        ),
        Preset(
            name="shacklett-ppo",
            description=(
                "LAMB with the weight norm in its trust ratio capped at 10 and the ratio "
                "clamped to [0.01, 100] (biases and norm weights without trust ratio), lr 5e-4 per 256 samples scaled by the square "
                "root, linear warm-up over 1 % of the run from half the rate, then a cosine "
                "to 1 % of it"
            ),
            reference=(
                "Shacklett et al. 2021, Large Batch Simulation for Deep Reinforcement Learning "
                "(ICLR 2021, arXiv 2103.07013; code shacklettbp/bps-nav)"
            ),
            values={
                "optimizer": "lamb",
                "optimizer_options": {
                    "weight_norm_clamp": (0.0, 10.0),
                    "trust_ratio_clamp": (0.01, 100.0),
                },
                "lr": 5e-4,
                "base_batch_size": 256,
                "scaling": "sqrt",
                "warmup_start": 0.5,
                "schedule": "cosine",
                "decay_floor": 0.01,
            },
            derived=_one_percent_warmup,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`UnknownNameError` listing the others."""
    if name not in PRESETS:
        raise UnknownNameError(unknown_name_message("preset", name, PRESETS))
    return PRESETS[name]


def apply_preset(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (the fields set explicitly) with preset ``name`` filled in (:meth:`Preset.apply`)."""
    return get_preset(name).apply(values)
