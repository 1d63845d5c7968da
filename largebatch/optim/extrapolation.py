"""Extrapolated gradient steps: take the gradient at ``w + u``, update from ``w``.

One wrapper covers the "extrapolated SGD" framework of Lin, Kong, Stich and Jaggi
(ICML 2020, EXTRAP-SGD) and sharpness-aware minimisation (Foret et al. 2021), which
is the same machinery with an ascent step. At the iterate ``w_t`` each step

1. forms the extrapolated point ``w~ = w_t + u_t``,
2. evaluates the gradient there through the closure,
3. returns to ``w_t`` and applies the base optimizer's update with that gradient.

``u_t`` per variant (``lr_t`` is the group's scheduled learning rate):

- ``extragradient`` (EXTRAP-SGD): ``u = -lr_t * ratio * g(w_t)``, ``g(w_t)`` from the
  step's mini-batch; the closure evaluates ``w~`` on a fresh mini-batch. With ``layerwise``
  (for LARS/LAMB bases) each tensor's ``g`` is first rescaled by ``||w|| / ||g||``.
- ``past`` (extrapolation from the past, Popov 1980): ``u = -lr_t * ratio * g(w~_{t-1})``,
  the previous step's gradient; one gradient evaluation per step.
- ``noise`` (perturbed SGD): ``u ~ N(0, noise_std^2 I)``; one evaluation per step.
- ``sam``: ``u = rho * g / ||g||`` on the same mini-batch; with ``adaptive`` (ASAM,
  Kwon et al. 2021) ``u = rho * T^2 g / ||T g||`` with ``T = |w| + adaptive_eta``.

A group whose base optimizer maximizes (``maximize=True``) extrapolates and perturbs
along ``+g`` instead: every ``u_t`` built from a gradient changes sign, so maximizing
``f`` steps exactly as minimizing ``-f`` does.

Outside ``step`` the parameters always hold ``w_t``, so evaluation and checkpoints see
the iterate, never ``w~``. After ``step`` each ``p.grad`` holds the gradient at ``w~``
(the one the base optimizer used), unless the base overwrites it (LAMB, ALTO with
``overwrite_grad=True``). How a training loop must drive ``step`` is in
:attr:`Extrapolation.step_protocol` (see :mod:`largebatch.optim.protocol`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import check_dense_gradients
from largebatch.optim.protocol import StepProtocol
from largebatch.optim.trust_ratio import group_uses_trust_ratio, lamb_trust_ratio, norms
from largebatch.optim.wrapper import OptimizerWrapper

STEP_PROTOCOLS: dict[str, StepProtocol] = {
    # g(w_t) from the loop (local under DDP: it only steers this rank's w~),
    # then one closure call on a fresh mini-batch, averaged across ranks.
    "extragradient": StepProtocol(
        gradient_before_step=True, closure="fresh", local_first_gradient=True
    ),
    # One closure call at w~ on the step's mini-batch; params stay at w_t between steps.
    "past": StepProtocol(gradient_before_step=False, closure="same"),
    "noise": StepProtocol(gradient_before_step=False, closure="same"),
    # g(w_t) from the loop (local under DDP, as in SAM's m-sharpness), closure on the same batch.
    "sam": StepProtocol(gradient_before_step=True, closure="same", local_first_gradient=True),
}
VARIANTS = tuple(STEP_PROTOCOLS)

# Constructor argument -> (param-group key, default, variants it applies to).
# The keys are prefixed so they never collide with a base optimizer's (Adadelta's ``rho``).
_HYPERPARAMETERS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "ratio": ("extrap_ratio", 1.0, ("extragradient", "past")),
    "layerwise": ("extrap_layerwise", False, ("extragradient", "past")),
    "noise_std": ("extrap_noise_std", 0.01, ("noise",)),
    "rho": ("extrap_rho", 0.05, ("sam",)),
    "adaptive": ("extrap_adaptive", False, ("sam",)),
    "adaptive_eta": ("extrap_adaptive_eta", 0.01, ("sam",)),
}

_SAM_NORM_EPS = 1e-12  # keeps u finite when the gradient is exactly zero


def _descent_sign(group: dict[str, Any]) -> float:
    """+1 where the base minimizes, -1 where its group sets ``maximize=True``."""
    return -1.0 if group.get("maximize", False) else 1.0


class Extrapolation(OptimizerWrapper):
    """Evaluate the gradient at an extrapolated point, then step the base optimizer from ``w_t``.

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` (SGD with Nesterov momentum in the
            paper; LARS and LAMB work too). The wrapper shares its parameter group
            dicts, so an LR scheduler on either object drives both.
        variant: ``"extragradient"`` (default), ``"past"``, ``"noise"`` or ``"sam"``.
        ratio: extrapolation step over the scheduled learning rate (``extragradient``,
            ``past``; default 1). The extrapolation uses the raw gradient, not the base's
            momentum or weight decay.
        layerwise: rescale each tensor's extrapolation to ``lr * ratio * ||w||`` (a LAMB-style
            ratio ``||w|| / ||g||``, 1 where a norm is 0) so it has the relative length of a
            layer-wise base's step, whose ``lr`` is not a step size for raw gradients.
            Groups with ``trust_ratio=False`` keep the raw form (``extragradient``, ``past``;
            default False; the ``extrap-lars``/``extrap-lamb`` registry entries turn it on).
        noise_std: standard deviation of the Gaussian ``u`` (``noise``; default 0.01).
        rho: radius of the ascent step (``sam``; default 0.05).
        adaptive: ASAM's per-parameter scaling (``sam``; default False).
        adaptive_eta: ASAM's ``eta`` in ``T = |w| + eta`` (``sam``; default 0.01).
        noise_seed: seeds a private generator for ``noise`` (saved in ``state_dict``);
            ``None`` draws from torch's default generator.

    A hyperparameter given for a variant that does not use it raises ``ValueError``.
    The variant's hyperparameters live in every param group under ``extrap_*`` keys
    (``extrap_ratio``, ``extrap_layerwise``, ``extrap_rho``, ...), so they can be set
    per group or scheduled.

    ``gradient_evaluations`` counts forward/backward passes over a step's batch: the
    loop's pre-step gradient (when the protocol asks for one) plus each closure call.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        variant: str = "extragradient",
        ratio: float | None = None,
        layerwise: bool | None = None,
        noise_std: float | None = None,
        rho: float | None = None,
        adaptive: bool | None = None,
        adaptive_eta: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        if variant not in STEP_PROTOCOLS:
            raise ValueError(
                f"Invalid extrapolation variant: {variant!r}; expected one of {VARIANTS}"
            )
        given = {
            "ratio": ratio,
            "layerwise": layerwise,
            "noise_std": noise_std,
            "rho": rho,
            "adaptive": adaptive,
            "adaptive_eta": adaptive_eta,
        }
        defaults = {}
        for name, value in given.items():
            key, default, variants = _HYPERPARAMETERS[name]
            if variant not in variants:
                if value is not None:
                    raise ValueError(
                        f"Invalid {name}={value!r}: variant {variant!r} does not use it"
                    )
                continue
            defaults[key] = default if value is None else value
        if noise_seed is not None and (variant != "noise" or not isinstance(noise_seed, int)):
            raise ValueError(
                f"Invalid noise_seed: {noise_seed!r}; an int, for variant 'noise' only"
            )

        self.variant = variant
        self.gradient_evaluations = 0
        self._anchors: dict[Tensor, Tensor] = {}
        super().__init__(base_optimizer, defaults)
        self._noise_generator = None
        if noise_seed is not None:
            device = self.param_groups[0]["params"][0].device
            self._noise_generator = torch.Generator(device=device).manual_seed(noise_seed)

    @property
    def step_protocol(self) -> StepProtocol:
        """The variant's protocol (see :data:`STEP_PROTOCOLS`)."""
        return STEP_PROTOCOLS[self.variant]

    def _check_group(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming the first invalid ``extrap_*`` hyperparameter."""
        for key in ("extrap_ratio", "extrap_noise_std", "extrap_rho", "extrap_adaptive_eta"):
            value = group.get(key)
            if value is not None and not (
                isinstance(value, int | float) and 0.0 <= value < float("inf")
            ):
                name = key.removeprefix("extrap_")
                raise ValueError(f"Invalid {name}: {value!r}; must be a finite number >= 0")
        for key in ("extrap_adaptive", "extrap_layerwise"):
            value = group.get(key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(
                    f"Invalid {key.removeprefix('extrap_')}: {value!r}; must be True or False"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One extrapolated step; returns the closure's loss at ``w~``.

        ``closure`` computes the loss and its gradients at the current parameters
        (``loss.backward()``) and returns the loss. It is called once, at ``w~``, with the
        gradients already cleared, so a closure that accumulates micro-batches works.

        Sparse gradients raise ``RuntimeError``: before anything changes when the
        gradient comes before ``step`` (``extragradient``, ``sam``), otherwise once the
        closure returns, with the parameters back at ``w_t`` and the base not stepped.
        """
        if closure is None:
            raise ValueError(
                f"Extrapolation (variant {self.variant!r}) needs step(closure): the closure "
                "re-computes the loss and gradients at the current parameters"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        if self.step_protocol.gradient_before_step:
            check_dense_gradients(type(self).__name__, params)
            if not any(p.grad is not None for p in params):
                raise RuntimeError(
                    f"Extrapolation (variant {self.variant!r}) extrapolates along the gradient "
                    "at the current parameters: call loss.backward() before step(closure)"
                )
            self.gradient_evaluations += 1

        moved = getattr(self, f"_extrapolate_{self.variant}")()
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.gradient_evaluations += 1
        if moved:
            torch._foreach_copy_(moved, [self._anchors[p] for p in moved])
        check_dense_gradients(type(self).__name__, params)

        if self.variant == "past":
            self._remember_gradients()
        self.base_optimizer.step()
        return loss

    # --- u_t per variant: each moves params to w~ and returns the moved params ----------

    def _extrapolate_extragradient(self) -> list[Tensor]:
        return self._move_along(lambda p: p.grad)

    def _extrapolate_past(self) -> list[Tensor]:
        return self._move_along(lambda p: self.state.get(p, {}).get("previous_grad"))

    def _move_along(self, direction_of: Callable[[Tensor], Tensor | None]) -> list[Tensor]:
        """``w~ = w -+ lr * ratio * d`` per group (``+`` if it maximizes; ``d`` rescaled if layer-wise)."""
        moved = []
        for group in self.param_groups:
            params = [p for p in group["params"] if direction_of(p) is not None]
            if params:
                self._save_anchors(params)
                directions = [direction_of(p) for p in params]
                if group["extrap_layerwise"] and group_uses_trust_ratio(group):
                    ratios = lamb_trust_ratio(norms(params), norms(directions))
                    directions = torch._foreach_mul(directions, list(ratios.unbind()))
                step = group["lr"] * group["extrap_ratio"]
                torch._foreach_add_(params, directions, alpha=-_descent_sign(group) * step)
                moved += params
        return moved

    def _extrapolate_noise(self) -> list[Tensor]:
        moved = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            self._save_anchors(params)
            noise = [
                torch.randn(
                    p.shape, generator=self._noise_generator, device=p.device, dtype=p.dtype
                )
                for p in params
            ]
            torch._foreach_add_(params, noise, alpha=group["extrap_noise_std"])
            moved += params
        return moved

    def _extrapolate_sam(self) -> list[Tensor]:
        """``u = rho * T^2 g / ||T g||`` with ``T = 1`` (SAM) or ``|w| + eta`` (ASAM), one global norm.

        The ascent on the loss becomes a descent in groups that maximize.
        """
        perturbed = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            scales = None
            if group["extrap_adaptive"]:
                scales = torch._foreach_abs(params)
                torch._foreach_add_(scales, group["extrap_adaptive_eta"])
                grads = torch._foreach_mul(grads, scales)
            perturbed.append((group, params, grads, scales))
        device = perturbed[0][1][0].device
        scaled_grad_norm = torch.linalg.vector_norm(
            torch.cat([norms(grads).to(device) for _, _, grads, _ in perturbed])
        )
        moved = []
        for group, params, grads, scales in perturbed:
            self._save_anchors(params)
            step = torch._foreach_div(grads, scaled_grad_norm + _SAM_NORM_EPS)
            if scales is not None:
                torch._foreach_mul_(step, scales)
            torch._foreach_add_(params, step, alpha=_descent_sign(group) * group["extrap_rho"])
            moved += params
        return moved

    # --- buffers ----------------------------------------------------------------------

    def _save_anchors(self, params: list[Tensor]) -> None:
        """Copy ``w_t`` into persistent per-parameter buffers (allocated once)."""
        for p in params:
            if p not in self._anchors:
                self._anchors[p] = torch.empty_like(p)
        torch._foreach_copy_([self._anchors[p] for p in params], params)

    def _remember_gradients(self) -> None:
        """``past``: keep the gradient at ``w~`` for the next step's extrapolation."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if "previous_grad" not in self.state[p]:
                self.state[p]["previous_grad"] = torch.empty_like(p)
        if params:
            torch._foreach_copy_(
                [self.state[p]["previous_grad"] for p in params], [p.grad for p in params]
            )

    # --- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state and groups, the base's under ``base_optimizer``, and counters."""
        state_dict = super().state_dict()
        generator = self._noise_generator
        state_dict["extrapolation"] = {
            "variant": self.variant,
            "gradient_evaluations": self.gradient_evaluations,
            "noise_generator": None if generator is None else generator.get_state(),
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the group dicts stay shared with the base."""
        own = dict(state_dict)
        extra = own.pop("extrapolation", None)
        if extra is None:
            raise ValueError(
                "Invalid state_dict: no 'extrapolation' entry (it was not saved by Extrapolation)"
            )
        if extra["variant"] != self.variant:
            raise ValueError(
                f"Invalid state_dict: saved by variant {extra['variant']!r}, "
                f"loading into variant {self.variant!r}"
            )
        super().load_state_dict(own)
        self.gradient_evaluations = extra["gradient_evaluations"]
        if self._noise_generator is not None and extra["noise_generator"] is not None:
            self._noise_generator.set_state(extra["noise_generator"])
