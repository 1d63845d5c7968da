"""One registry of optimizers: it drives the factory, the CLI help, the docs and the tests.

Each :class:`OptimizerSpec` names its class lazily (``"module:attr"``) so importing
the registry stays cheap and an optimizer module is loaded only when used.
Adding an optimizer means adding one ``register(...)`` call below.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from largebatch.optim.param_groups import param_groups
from largebatch.utils.errors import unknown_name_message

ScalingRule = str  # "none" | "linear" | "sqrt"


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the library knows about one optimizer.

    Attributes:
        name: registry key, as typed on the command line.
        target: ``"module:attr"`` of the class (or factory) to build.
        description: one line for ``largebatch list optimizers`` and the docs.
        defaults: hyperparameters applied unless the caller overrides them.
        layerwise: honours the per-group ``trust_ratio`` switch (LARS, LAMB, ALTO).
        wraps: the optimizer wraps a base optimizer built from the registry; the
            value is the default base name (e.g. the E adaptor, extrapolation).
        scaling_rule: recommended learning-rate scaling with batch size.
        warmup: recommended warm-up length as a fraction of the run.
        reference: the paper or source the implementation follows.
        data_arguments: constructor arguments that describe the training data and
            that whoever builds it for a run fills in (``num_examples``: the size of
            the training set, for SAGA's table); they are not hyperparameters.
        couples_parameters: one step of a parameter depends on the others' history
            (a shared curvature memory or snapshot schedule), so a parameter that
            gets its first gradient late does not step as a fresh optimizer on it
            would (L-BFGS family, SVRG). The contract suite checks such optimizers
            for consistency instead.
        steps_on_meta: steps run on ``meta`` tensors. ``False``: the method's control
            flow reads values (a line search, CG's exit tests) and the constructor
            refuses meta parameters with a ``ValueError``.
    """

    name: str
    target: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    layerwise: bool = False
    wraps: str | None = None
    scaling_rule: ScalingRule = "none"
    warmup: float = 0.0
    reference: str = ""
    data_arguments: tuple[str, ...] = ()
    couples_parameters: bool = False
    steps_on_meta: bool = True

    def load(self) -> type:
        """Import and return the optimizer class."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, OptimizerSpec] = {}


#: the data arguments a run knows how to fill in (``OptimizerSpec.data_arguments``)
DATA_ARGUMENTS = ("num_examples",)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a spec to the registry; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    unknown = sorted(set(spec.data_arguments) - set(DATA_ARGUMENTS))
    if unknown:
        raise ValueError(f"Invalid data_arguments: {unknown} (known: {list(DATA_ARGUMENTS)})")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under ``name``; a ``KeyError`` that lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(unknown_name_message("optimizer", name, _REGISTRY)) from None


def list_optimizers() -> list[OptimizerSpec]:
    """All registered specs, in registration order."""
    return list(_REGISTRY.values())


@dataclass(frozen=True)
class OptimizerArguments:
    """What :func:`create_optimizer` accepts for one optimizer, and with which defaults.

    Attributes:
        defaults: every keyword argument -> the value used when it is left out
            (the spec's default, else the constructor's; ``None`` if it has none).
            A wrapper's include its base optimizer's and ``base``. A constructor's
            integer default for an argument annotated as a float reads as a float
            (torch's ``momentum: float = 0`` takes ``0.9``).
        lr: the learning rate used when none is given (a wrapper's comes from its
            base); ``None`` if the optimizer has none.
        optional: the arguments that take ``None`` (annotated so, or defaulting to it).
        open: the constructor takes ``**kwargs``, so names beyond ``defaults`` pass too.
    """

    defaults: Mapping[str, Any]
    lr: float | None
    optional: frozenset[str] = frozenset()
    open: bool = False


def optimizer_arguments(name: str, base: str | None = None) -> OptimizerArguments:
    """The keyword arguments optimizer ``name`` accepts and its default learning rate.

    ``base`` is a wrapper's ``base=`` hyperparameter (its default base when
    ``None``), so ``optimizer_arguments("e", base="lamb")`` includes LAMB's
    arguments and LAMB's learning rate. Raises ``KeyError`` for an unknown name
    and ``ValueError`` for a ``base`` given to an optimizer that wraps none.
    """
    spec = get_spec(name)
    if base is not None and spec.wraps is None:
        raise ValueError(f"Invalid base: {base!r} ({name!r} does not wrap another optimizer)")
    defaults: dict[str, Any] = {}
    optional: set[str] = set()
    is_open = False
    if spec.wraps is not None:
        inner = optimizer_arguments(base or spec.wraps)
        defaults.update(inner.defaults)
        defaults["base"] = base or spec.wraps
        optional |= inner.optional
        is_open = inner.open
    # the first argument is the parameters (or, for a wrapper, the base optimizer)
    for param in list(inspect.signature(spec.load()).parameters.values())[1:]:
        if param.kind is param.VAR_KEYWORD:
            is_open = True
        elif param.kind is not param.VAR_POSITIONAL:
            default = None if param.default is param.empty else param.default
            annotation = str(param.annotation)
            if type(default) is int and "float" in annotation:
                default = float(default)
            if default is None or "None" in annotation or "Optional" in annotation:
                optional.add(param.name)
            defaults[param.name] = default
    defaults.update(spec.defaults)
    lr = defaults.get("lr")
    return OptimizerArguments(MappingProxyType(defaults), lr, frozenset(optional), is_open)


def is_decentralized(name: str, base: str | None = None) -> bool:
    """Whether optimizer ``name`` trains decentralized: it takes a ``topology`` to gossip over.

    Such an optimizer needs at least 2 processes and keeps the gradients local
    (``StepProtocol.local_gradients``). ``base`` as in :func:`optimizer_arguments`.
    """
    return "topology" in optimizer_arguments(name, base).defaults


def _accepted_keys(cls: type) -> set[str] | None:
    """Keyword arguments a constructor accepts, or None if it takes ``**kwargs``."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build a registered optimizer.

    ``model_or_params`` may be a module, in which case parameters are split with
    :func:`~largebatch.optim.param_groups.param_groups` (1-D parameters get no
    weight decay and, for layer-wise optimizers, no trust ratio), or anything
    ``torch.optim`` accepts. ``hparams`` override the spec's defaults; for a
    wrapper (``spec.wraps``), ``base`` names the base optimizer and every
    hyperparameter the wrapper does not accept goes to the base.
    """
    spec = get_spec(name)
    cls = spec.load()
    merged = {**spec.defaults, **hparams}

    if spec.wraps is not None:
        base_name = merged.pop("base", spec.wraps)
        accepted = _accepted_keys(cls) or set()
        own = {k: v for k, v in merged.items() if k in accepted}
        base_hparams = {k: v for k, v in merged.items() if k not in accepted}
        base = create_optimizer(base_name, model_or_params, **base_hparams)
        return cls(base, **own)

    missing = [key for key in spec.data_arguments if key not in merged]
    if missing:
        raise TypeError(
            f"{name}: missing data argument(s) {missing} (the training set's size: a run "
            "fills it in; pass it when building the optimizer yourself)"
        )
    accepted = _accepted_keys(cls)
    if accepted is not None:
        unknown = sorted(set(merged) - accepted)
        if unknown:
            raise TypeError(
                f"{name}: unknown hyperparameter(s) {unknown}; "
                f"accepted: {sorted(accepted - {'self', 'params'})}"
            )

    if isinstance(model_or_params, nn.Module):
        params = param_groups(
            model_or_params,
            weight_decay=merged.get("weight_decay", 0.0),
            layerwise=spec.layerwise,
        )
    else:
        params = model_or_params
    return cls(params, **merged)


# --- the registry -----------------------------------------------------------------

register(
    OptimizerSpec(
        name="sgd",
        target="torch.optim:SGD",
        description="SGD with heavy-ball momentum (torch.optim.SGD); lr 0.025 at batch 64 = 0.1 per 256 (Goyal et al.).",
        defaults={"lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "foreach": True},
        scaling_rule="linear",
        warmup=0.05,
        reference="Goyal et al. 2017 (linear scaling + warm-up)",
    )
)
register(
    OptimizerSpec(
        name="adamw",
        target="torch.optim:AdamW",
        description="Adam with decoupled weight decay (torch.optim.AdamW).",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-2},
        scaling_rule="sqrt",
        warmup=0.05,
        reference="Loshchilov & Hutter 2019",
    )
)
register(
    OptimizerSpec(
        name="adagrad",
        target="torch.optim:Adagrad",
        description="AdaGrad (torch.optim.Adagrad).",
        defaults={"lr": 1e-2},
        scaling_rule="sqrt",
        reference="Duchi et al. 2011",
    )
)

# Extrapolation family (largebatch/optim/extrapolation.py): ``variant`` picks u_t
# (extragradient, past, noise, sam); two gradient evaluations per step for
# extragradient and sam, one for past and noise.
register(
    OptimizerSpec(
        name="extrap-sgd",
        target="largebatch.optim.extrapolation:Extrapolation",
        description="EXTRAP-SGD: gradient at w - lr*g(w) on a fresh batch, Nesterov SGD step from w (2 grads/step).",
        defaults={"variant": "extragradient", "nesterov": True},
        wraps="sgd",
        scaling_rule="linear",
        warmup=0.05,
        reference="Lin, Kong, Stich & Jaggi, ICML 2020 (arXiv 2006.05720)",
    )
)
register(
    OptimizerSpec(
        name="extrap-lars",
        target="largebatch.optim.extrapolation:Extrapolation",
        description="Extragradient over LARS: layer-wise extrapolation (relative length lr*ratio, ratio = LARS trust_coef), LARS step (2 grads/step).",
        defaults={"variant": "extragradient", "layerwise": True, "ratio": 1e-3},
        wraps="lars",
        scaling_rule="linear",
        warmup=0.05,
        reference="Lin, Kong, Stich & Jaggi, ICML 2020 (arXiv 2006.05720)",
    )
)
register(
    OptimizerSpec(
        name="extrap-lamb",
        target="largebatch.optim.extrapolation:Extrapolation",
        description="Extragradient over LAMB: layer-wise extrapolation (relative length lr*ratio), LAMB step (2 grads/step).",
        defaults={"variant": "extragradient", "layerwise": True},
        wraps="lamb",
        scaling_rule="sqrt",
        warmup=0.05,
        reference="Lin, Kong, Stich & Jaggi, ICML 2020 (arXiv 2006.05720)",
    )
)
register(
    OptimizerSpec(
        name="sam",
        target="largebatch.optim.extrapolation:Extrapolation",
        description="Sharpness-aware minimization: gradient at w + rho*g/||g|| on the same batch, SGD step from w (2 grads/step).",
        defaults={"variant": "sam"},
        wraps="sgd",
        scaling_rule="linear",
        warmup=0.05,
        reference="Foret et al., ICLR 2021; ASAM (adaptive=True): Kwon et al., ICML 2021",
    )
)

# E adaptor and ALTO (largebatch/optim/e_adaptor.py, alto.py): paper large-batch
# defaults (alpha=-5, beta1=0.99); small batches (< 1K): alpha=0.5, beta1=0.01.
register(
    OptimizerSpec(
        name="e",
        target="largebatch.optim.e_adaptor:E",
        description="E adaptor: any base optimizer (default AdamW) steps on g + alpha * EMA(gradient differences).",
        defaults={"alpha": -5.0, "beta1": 0.99},
        wraps="adamw",
        scaling_rule="sqrt",
        warmup=0.05,
        reference="Zhao, Li, Zhou, Tan & Jia, NeurIPS 2025 (arXiv 2510.27153), Alg. 5",
    )
)
register(
    OptimizerSpec(
        name="alto",
        target="largebatch.optim.alto:ALTO",
        description="ALTO: LAMB (bias-corrected, layer-wise trust ratio) fed E-extrapolated gradients.",
        defaults={
            "lr": 1e-2,
            "betas": (0.9, 0.99),
            "alpha": -5.0,
            "e_beta1": 0.99,
            "weight_decay": 1e-4,
        },
        layerwise=True,
        scaling_rule="sqrt",
        warmup=0.05,
        reference="Zhao, Li, Zhou, Tan & Jia, NeurIPS 2025 (arXiv 2510.27153), Alg. 2",
    )
)

# Shampoo (largebatch/optim/shampoo/): grafted from Adam, so Adam-like learning rates.
register(
    OptimizerSpec(
        name="shampoo",
        target="largebatch.optim.shampoo:Shampoo",
        description="Shampoo: blocked Kronecker-factored preconditioner, Adam-grafted step norms, stale async inverse roots shared across ranks.",
        defaults={"lr": 1e-3, "precondition_frequency": 100},
        scaling_rule="sqrt",
        warmup=0.05,
        reference="Anil, Gupta, Koren, Regan & Singer 2021 (arXiv 2002.09018); Shi et al. 2023 (arXiv 2309.06497)",
    )
)

# LARS and LAMB (largebatch/optim/lars.py, lamb.py): layer-wise trust ratios; pass
# ``compiled=True`` for the torch.compile'd step (fastest on CPU, see benchmarks/optimizer_step.py).
register(
    OptimizerSpec(
        name="lars",
        target="largebatch.optim.lars:LARS",
        description="LARS: momentum SGD with a layer-wise trust ratio eta*norm(w)/(norm(g) + wd*norm(w)); optional LARC clipping and Nesterov.",
        defaults={"lr": 1.0, "momentum": 0.9, "weight_decay": 5e-4, "trust_coef": 1e-3},
        layerwise=True,
        scaling_rule="linear",
        warmup=0.05,
        reference="You, Gitman & Ginsburg 2017 (arXiv 1708.03888); LARC clipping: NVIDIA apex",
    )
)
register(
    OptimizerSpec(
        name="lamb",
        target="largebatch.optim.lamb:LAMB",
        description="LAMB: bias-corrected Adam direction r plus weight decay, scaled per layer by norm(w)/norm(r).",
        defaults={"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2},
        layerwise=True,
        scaling_rule="sqrt",
        warmup=0.05,
        reference="You et al., ICLR 2020 (arXiv 1904.00962), Alg. 2",
    )
)

# The classical large-scale methods of Bottou, Curtis & Nocedal (2018): variance reduction
# (svrg.py, saga.py), subsampled Newton-CG (newton_cg.py) and stochastic quasi-Newton
# (quasi_newton.py). They declare a ClassicalStepProtocol: the training loop's step driver
# (largebatch/train/step.py) runs SVRG's snapshots, SAGA's per-example gradients and the
# loss closures and Hessian samples of Newton-CG, SQN and L-BFGS. docs/classical.md.
register(
    OptimizerSpec(
        name="svrg",
        target="largebatch.optim.svrg:SVRG",
        description="SVRG: g(w) - g(w~) + full gradient at the snapshot w~, a full pass every `inner_steps` steps (2 grads/step + n per snapshot).",
        defaults={"lr": 0.1, "inner_steps": 100},
        reference="Johnson & Zhang 2013; Bottou, Curtis & Nocedal 2018, Alg. 5.1",
        couples_parameters=True,
    )
)
register(
    OptimizerSpec(
        name="saga",
        target="largebatch.optim.saga:SAGA",
        description="SAGA: per-example gradient table (n copies of the parameters), unbiased variance-reduced direction; one process.",
        defaults={"lr": 0.1},
        reference="Defazio, Bach & Lacoste-Julien 2014; Bottou, Curtis & Nocedal 2018, Alg. 5.2",
        data_arguments=("num_examples",),
    )
)
register(
    OptimizerSpec(
        name="newton-cg",
        target="largebatch.optim.newton_cg:NewtonCG",
        description="Subsampled Hessian-free Newton-CG: CG on Hessian-vector products (tolerance, cap, negative-curvature exit), Armijo backtracking.",
        defaults={"lr": 1.0, "cg_tol": 0.1, "max_cg": 10},
        reference="Byrd, Chin, Neveitt & Nocedal 2011; Bottou, Curtis & Nocedal 2018, Alg. 6.1",
        steps_on_meta=False,
    )
)
register(
    OptimizerSpec(
        name="olbfgs",
        target="largebatch.optim.quasi_newton:OLBFGS",
        description="Online L-BFGS: curvature pairs from the same batch at both points, two-loop recursion over the last `memory` pairs (2 grads/step).",
        defaults={"lr": 0.1, "memory": 10},
        reference="Schraudolph, Yu & Guenter 2007; Bottou, Curtis & Nocedal 2018, Sec. 6.2 (6.13)",
        couples_parameters=True,
    )
)
register(
    OptimizerSpec(
        name="sqn",
        target="largebatch.optim.quasi_newton:SQN",
        description="Stochastic quasi-Newton: L-BFGS pairs from Hessian-vector products at averaged iterates every `update_every` steps.",
        defaults={"lr": 0.1, "memory": 10, "update_every": 20},
        reference="Byrd, Hansen, Nocedal & Singer 2016; Bottou, Curtis & Nocedal 2018, Sec. 6.2 (6.14)",
        couples_parameters=True,
    )
)
register(
    OptimizerSpec(
        name="lbfgs",
        target="largebatch.optim.quasi_newton:LBFGS",
        description="L-BFGS with Armijo backtracking on the step's batch; with the full training set as batch, the classical deterministic method.",
        defaults={"lr": 1.0, "memory": 10},
        reference="Nocedal & Wright 2006, Alg. 7.5; Bottou, Curtis & Nocedal 2018, Fig. 3.1",
        couples_parameters=True,
        steps_on_meta=False,
    )
)

# Decentralized optimizers (largebatch/optim/decentralized/): each process averages its
# parameters with its neighbours in ``topology`` instead of all-reducing gradients; they
# need >= 2 processes. SGD's recipe, so that the three compare at equal settings.
register(
    OptimizerSpec(
        name="dmsgd",
        target="largebatch.optim.decentralized:DmSGD",
        description="Decentralized momentum SGD: local heavy-ball step and averaging with the topology's neighbours (variant atc, awc, da or qg).",
        defaults={"lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "topology": "exp"},
        scaling_rule="linear",
        warmup=0.05,
        reference="Lian et al. 2017 (D-PSGD); AWC: Assran et al. 2019; DA: Yu, Jin & Yang 2019; QG: Lin et al. 2021",
    )
)
register(
    OptimizerSpec(
        name="decentlam",
        target="largebatch.optim.decentralized:DecentLaM",
        description="DecentLaM: decentralized momentum SGD without the momentum-incurred inconsistency bias of DmSGD at large batch.",
        # ring, not exp: on the directed exponential graphs (exp, one-peer-exp) its heavy-ball
        # form is unstable at momentum 0.9 whatever the rate (docs/decentralized.md)
        defaults={"lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "topology": "ring"},
        scaling_rule="linear",
        warmup=0.05,
        reference="Yuan et al., ICCV 2021 (arXiv 2104.11981)",
    )
)
register(
    OptimizerSpec(
        name="slowmo",
        target="largebatch.optim.decentralized:SlowMo",
        description="SlowMo: every slow_every steps of a decentralized base (default DmSGD), an exact average and a slow momentum step.",
        defaults={"slow_every": 12, "slow_momentum": 0.5, "slow_lr": 1.0},
        wraps="dmsgd",
        couples_parameters=True,  # one slow-step schedule for all parameters
        scaling_rule="linear",
        warmup=0.05,
        reference="Wang, Tantia, Ballas & Rabbat, ICLR 2020 (arXiv 1910.00643)",
    )
)
