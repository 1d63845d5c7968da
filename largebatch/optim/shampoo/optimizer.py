"""Shampoo (Anil et al. 2021, "Scalable Second Order Optimization for Deep Learning").

Per block ``G`` (see :mod:`.blocking`), one statistic per tensor dimension accumulates the
mode unfoldings ``G_(d) G_(d)^T`` (a sum, or an EMA with ``beta2 < 1``) from ``epsilon * I``.
The step direction multiplies the momentum by each statistic's inverse root
``S_d^(-1/(2k))`` for an order-k block (``L^(-1/4) M R^(-1/4)`` for a matrix) and takes its
per-block norm from a grafted optimizer (Adam by default). Inverse roots are recomputed
every ``precondition_frequency`` steps from a snapshot, on a background thread, and
installed exactly ``staleness`` steps later; under ``torch.distributed`` each rank computes
only the roots of the blocks it owns and broadcasts them.

The class wires the parts: :mod:`.layout` (where each block's state lives), :mod:`.step`
(the batched arithmetic), :mod:`.roots` (root scheduling and failures),
:mod:`.distributed` (root ownership across ranks) and :mod:`.cuda_graph` (replaying the
steady-state step). Hyperparameters live in ``param_groups``. Structural ones
(``max_preconditioner_dim``, ``max_preconditioned_dim``, ``factor_dtype``, ``grafting``)
are read when the group is added; the others may change during training.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.shampoo.config import (
    DistributedConfig,
    GraftingConfig,
    RootConfig,
    require,
    resolve_group,
)
from largebatch.optim.shampoo.cuda_graph import StepGraphs
from largebatch.optim.shampoo.distributed import RootDistributor, Topology
from largebatch.optim.shampoo.layout import ActiveSet, GroupLayout, Partition
from largebatch.optim.shampoo.roots import (
    COUNTERS,
    FactorReport,
    RootScheduler,
    factor_reports,
    failure_count,
    new_counters,
)
from largebatch.optim.shampoo.scalars import StepScalars
from largebatch.optim.shampoo.step import StepSettings, apply, gather, prepare


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo with grafting, momentum, decoupled weight decay and stale async roots.

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives failures names).
        lr: learning rate (applied to the grafted step size).
        betas: ``(beta1, beta2)``: momentum EMA of the gradient, and the statistics EMA
            (``beta2 = 1`` sums them, as AdaGrad does).
        epsilon: statistics start at ``epsilon * I``.
        weight_decay: decoupled weight decay (``p <- p - lr * weight_decay * p``).
        nesterov: precondition ``beta1 * M + (1 - beta1) * G`` instead of ``M``.
        maximize: maximize the objective (step along the gradient), as in ``torch.optim``.
        max_preconditioner_dim: block size: merged dimensions above it are split.
        max_preconditioned_dim: parameters with a dimension above it (embeddings, output
            layers) get the grafted diagonal step only, as do 1-D parameters.
        precondition_frequency: inverse roots are recomputed every this many steps.
        start_preconditioning_step: before a parameter's own step count reaches it, the
            grafted step alone (default: the first step with computed roots,
            ``precondition_frequency + staleness``).
        staleness: roots computed from the statistics of step ``t0`` are used from step
            ``t0 + staleness``; 0 computes them in the step itself. Default:
            ``max(1, precondition_frequency // 4)`` when asynchronous, else 0.
        grafting: a grafting config or name: ``"adam"`` (default), ``"adagrad"``,
            ``"rmsprop"``, ``"sgd"``.
        roots: a :class:`RootConfig` or method name: ``"eigh"`` (default), ``"coupled_newton"``.
        factor_dtype: dtype of statistics and roots (float32 or float64; a dtype or its
            name).
        matmul_dtype: dtype (or its name) of the per-step matrix products (statistics and
            preconditioning): ``None`` uses ``factor_dtype``; ``torch.bfloat16`` rounds
            their operands (and results) to bfloat16, faster on hardware with bfloat16
            matrix units (AMX, tensor cores), while the statistics still accumulate and
            the roots are still computed in ``factor_dtype``.
        asynchronous: compute roots on a background thread (needs ``staleness >= 1``);
            the result is identical to the synchronous computation.
        distributed: share root computations across data-parallel ranks; by default across
            the default process group when ``torch.distributed`` is initialised
            (``DistributedConfig(enabled=False)`` opts out).
        cuda_graphs: on CUDA, replay the steady-state step (every parameter with a gradient,
            no root refresh due) as a captured CUDA graph; ``False`` runs every step eagerly.

    The bias corrections follow each parameter's own step count (as ``torch.optim.Adam``
    does), so a parameter that gets its first gradient late takes the steps a fresh
    optimizer would; the root schedule is the group's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        max_preconditioner_dim: int = 1024,
        max_preconditioned_dim: int = 8192,
        precondition_frequency: int = 100,
        start_preconditioning_step: int | None = None,
        staleness: int | None = None,
        grafting: GraftingConfig | str = "adam",
        roots: RootConfig | str = "eigh",
        factor_dtype: torch.dtype = torch.float32,
        matmul_dtype: torch.dtype | None = None,
        asynchronous: bool = True,
        distributed: DistributedConfig | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        require(isinstance(asynchronous, bool), f"Invalid asynchronous: {asynchronous!r}")
        require(isinstance(cuda_graphs, bool), f"Invalid cuda_graphs: {cuda_graphs!r}")
        self.asynchronous = asynchronous
        self.cuda_graphs = cuda_graphs
        self._start(Topology.resolve(distributed))
        defaults = dict(
            lr=lr,
            betas=betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            max_preconditioner_dim=max_preconditioner_dim,
            max_preconditioned_dim=max_preconditioned_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            staleness=staleness,
            grafting=grafting,
            roots=roots,
            factor_dtype=factor_dtype,
            matmul_dtype=matmul_dtype,
        )
        resolve_group(dict(defaults), asynchronous)  # fail on bad defaults before any group
        super().__init__(params, defaults)

    def _start(self, topology: Topology) -> None:
        """What is not optimizer state: the layouts (built per group), root scheduling, graphs."""
        self._layouts: list[GroupLayout] = []
        self._roots = RootScheduler(self.asynchronous, RootDistributor(topology))
        self._graphs = StepGraphs(self.cuda_graphs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's settings, then block its parameters and allocate their state."""
        settings = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        resolved = {
            k: v
            for k, v in resolve_group(settings, self.asynchronous).items()
            if k in self.defaults
        }
        super().add_param_group({**param_group, **resolved})
        if not self.param_groups[-1]["params"]:
            self.param_groups.pop()
            raise ValueError("Invalid parameter group: it has no parameters")
        self._build(len(self.param_groups) - 1)

    def _build(self, group_index: int) -> None:
        """The group's layout and owners, and its parameters' state (views of the layout)."""
        group = self.param_groups[group_index]
        layout = GroupLayout(group_index, group)
        self._layouts.append(layout)
        self._roots.distributor.assign(layout.buckets)
        self._bind_state(group_index)
        for param in group["params"]:
            self.state[param]["step"] = torch.tensor(0, dtype=torch.int64)
        self.state[group["params"][0]].update(new_counters())

    def _bind_state(self, group_index: int) -> None:
        layout = self._layouts[group_index]
        for index, param in enumerate(self.param_groups[group_index]["params"]):
            self.state[param].update(layout.state_views(index))

    # --- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # before anything changes
            for param in group["params"]:
                if param.grad is not None and param.grad.is_sparse:
                    raise RuntimeError("Shampoo does not support sparse gradients")
        for group_index, group in enumerate(self.param_groups):
            self._step_group(group_index, group)
        return loss

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        layout = self._layouts[group_index]
        params: list[Tensor] = group["params"]
        active = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if not active:
            return
        counters = self.state[params[0]]
        counters["group_step"] += 1
        step = int(counters["group_step"])  # CPU tensors: no device synchronisation
        step_counts = [self.state[params[i]]["step"] for i in active]
        torch._foreach_add_(step_counts, 1)
        counts = dict(zip(active, torch.stack(step_counts).tolist()))
        if group["staleness"] > 0 and layout.ensure_snapshots():
            self._bind_state(group_index)
        settings = StepSettings.of(group)
        event = self._roots.event_due(group, counters, step)
        eager = []
        for part in layout.partitions:
            mine = tuple(i for i in active if i in part.param_units)
            if not mine:
                continue
            plan = part.active_set(mine)
            scalars = StepScalars.for_steps(
                group,
                layout.grafting.correction,
                layout.grafting.epsilon,
                [counts[unit.param] for unit in plan.units],
            )
            preconditioned = frozenset(
                i for i in mine if counts[i] >= group["start_preconditioning_step"]
            )
            gather(part, plan, params, layout.blockings)
            if not event and self._replayable(part, plan, scalars, preconditioned):
                self._replay(group_index, layout, part, plan, settings, scalars, preconditioned)
                continue
            directions = prepare(part, plan, settings, layout.grafting, scalars)
            eager.append((part, plan, directions, scalars, preconditioned))
        self._roots.update(group_index, group, layout.buckets, counters, step)
        for part, plan, directions, scalars, preconditioned in eager:
            apply(
                part, plan, params, layout.blockings, directions, settings, scalars, preconditioned
            )

    def _replayable(
        self,
        part: Partition,
        plan: ActiveSet,
        scalars: StepScalars,
        preconditioned: frozenset[int],
    ) -> bool:
        """A step a CUDA graph can run: the same scalars for every unit, one phase for all."""
        return (
            self._graphs.eligible(part.device, part.dtype)
            and scalars.uniform
            and len(preconditioned) in (0, len(plan.params))
        )

    def _replay(
        self,
        group_index: int,
        layout: GroupLayout,
        part: Partition,
        plan: ActiveSet,
        settings: StepSettings,
        scalars: StepScalars,
        preconditioned: frozenset[int],
    ) -> None:
        params = self.param_groups[group_index]["params"]
        if preconditioned and settings.matmul_dtype is not None:
            for bucket in part.buckets:  # refresh cast roots outside the graph
                bucket.roots_in(settings.matmul_dtype)

        def body(step_scalars: StepScalars) -> None:
            directions = prepare(part, plan, settings, layout.grafting, step_scalars)
            apply(
                part, plan, params, layout.blockings, directions, settings, step_scalars,
                preconditioned,
            )  # fmt: skip

        fingerprint = (
            settings,
            bool(preconditioned),
            plan.params,
            tuple(params[i].data_ptr() for i in plan.params),
        )
        self._graphs.run(
            part,
            fingerprint,
            body,
            scalars,
            can_capture=not self._roots.busy(group_index),
        )

    # --- what the optimizer exposes ---------------------------------------------------

    @property
    def _buckets(self) -> list:
        return [bucket for layout in self._layouts for bucket in layout.buckets]

    @property
    def root_failure_count(self) -> int:
        """Inverse-root computations rejected so far (their previous roots were kept)."""
        return failure_count(self._buckets)

    @property
    def factors_computed(self) -> int:
        """Inverse roots this rank has computed so far."""
        return self._roots.factors_computed

    @property
    def root_staleness(self) -> int | None:
        """Steps since the statistics behind the oldest roots in use (None before any roots)."""
        ages = []
        for group in self.param_groups:
            counters = self.state[group["params"][0]]
            if int(counters["roots_step"]) >= 0:
                ages.append(int(counters["group_step"]) - int(counters["roots_step"]))
        return max(ages) if ages else None

    def root_report(self) -> list[FactorReport]:
        """Residual, owner and failure counts of every factor's inverse root."""
        return factor_reports(self._buckets)

    # --- checkpoints and copies ------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by a Shampoo with the same parameters and blocking.

        Tensors are restored in their saved dtype (``torch.optim`` would cast them to the
        parameter's dtype), layout-backed ones (statistics, roots, momentum, ...) by copying
        into this optimizer's buffers; a root computation that was pending restarts from
        its saved snapshot. A state whose blocking differs raises before anything changes.
        """
        saved_ids = iter([i for g in state_dict["param_groups"] for i in g["params"]])
        saved = [
            _upgraded([state_dict["state"].get(next(saved_ids), {}) for _ in group["params"]])
            for group in self.param_groups
        ]
        for group_index, saved_group in enumerate(saved):
            self._check_shapes(group_index, saved_group)
        self._roots.discard_all()
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # states saved before these options existed
            group.setdefault("matmul_dtype", None)
            group.setdefault("maximize", False)
        self._restore(saved)

    def _check_shapes(self, group_index: int, saved_group: list[dict[str, Any]]) -> None:
        layout = self._layouts[group_index]
        has_snapshots = any("snapshot" in key for state in saved_group for key in state)
        if has_snapshots and layout.ensure_snapshots():
            self._bind_state(group_index)
        for index, state in enumerate(saved_group):
            for key, view in layout.state_views(index).items():
                if key not in state and "snapshot" in key:
                    continue
                if key not in state or state[key].shape != view.shape:
                    found = tuple(state[key].shape) if key in state else "missing"
                    raise ValueError(
                        f"Invalid Shampoo state_dict: {key!r} of {layout.blockings[index].name} "
                        f"is {found}, expected {tuple(view.shape)} (saved with a different blocking?)"
                    )

    def _restore(self, saved: list[list[dict[str, Any]]]) -> None:
        """Rebind every parameter's state to the layouts, copying in the saved values."""
        for group_index, (group, saved_group) in enumerate(zip(self.param_groups, saved)):
            layout = self._layouts[group_index]
            for index, (param, values) in enumerate(zip(group["params"], saved_group)):
                views = layout.state_views(index)
                self.state[param] = {
                    key: views[key].copy_(value)
                    if key in views
                    else value.clone()
                    if key in ("step", *COUNTERS)
                    else value.to(param.device, copy=True)
                    for key, value in values.items()
                }

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps defaults, state and param_groups; the rest is rebuilt from them.
        return {
            **super().__getstate__(),
            "_shampoo": {
                "asynchronous": self.asynchronous,
                "cuda_graphs": self.cuda_graphs,
                "topology": self._roots.distributor.topology,
            },
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        runtime = state.pop("_shampoo", None)
        super().__setstate__(state)
        if runtime is None:  # torch.optim's load_state_dict: _restore follows
            return
        # Unpickled or deep-copied: rebuild the layouts and copy the state into them.
        saved = [[self.state.get(p, {}) for p in group["params"]] for group in self.param_groups]
        self.asynchronous = runtime["asynchronous"]
        self.cuda_graphs = runtime["cuda_graphs"]
        self._start(runtime["topology"])
        self.state = defaultdict(dict)
        for group_index in range(len(self.param_groups)):
            self._build(group_index)
        for group_index, saved_group in enumerate(saved):
            self._check_shapes(group_index, saved_group)
        self._restore(saved)


def _upgraded(saved_group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A group's saved states with per-parameter step counts.

    States saved before them kept one ``step`` (the group's) in the first parameter's
    state: it becomes ``group_step``, and every parameter's count.
    """
    first = saved_group[0] if saved_group else {}
    if "roots_step" not in first or "group_step" in first:
        return saved_group
    step = first["step"]
    upgraded = [{**state, "step": step.clone()} for state in saved_group]
    upgraded[0]["group_step"] = step.clone()
    return upgraded
