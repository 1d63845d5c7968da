"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

``G`` is the true gradient and ``Sigma`` the per-example gradient covariance, so
a batch-B gradient ``G_B`` has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch
sizes ``b_small < b_big`` give unbiased estimates (paper, Appendix A.1):

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Single-step estimates are very noisy (either can be negative), so
:class:`NoiseScaleTracker` keeps exponential moving averages of numerator and
denominator separately and reports their ratio. B_simple approximates the
critical batch size: below it, doubling the batch nearly halves the steps.

Getting the two squared norms without an extra backward pass
------------------------------------------------------------

*Data parallel (DDP)*: the per-rank gradient is the small batch and the
all-reduced one the big batch. :class:`GradientNormRecorder` installs a DDP
communication hook that records each bucket's squared norm before and after the
usual averaging all-reduce::

    recorder = GradientNormRecorder(ddp_model)        # once, after wrapping
    tracker = NoiseScaleTracker(decay=0.99)
    ...
    loss.backward()                                   # the synchronising backward
    small, big = recorder.read()                      # collective: call on every rank
    tracker.update(small, per_rank_batch, big, global_batch)
    if step % log_every == 0:
        log(tracker.estimate().to_dict())

*One process with gradient accumulation over k >= 2 micro-batches of size m*
(loss divided by k): the first micro-batch's gradient is the small batch, the
accumulated one the big batch::

    for i, (x, y) in enumerate(micro_batches):
        (loss_fn(model(x), y) / k).backward()
        if i == 0:
            small = gradient_sqnorm(model.parameters()) * k**2
    big = gradient_sqnorm(model.parameters())
    tracker.update(small, m, big, k * m)

Inputs may be 0-dim tensors on the training device; the tracker then never
synchronises with the host until :meth:`NoiseScaleTracker.estimate` is called.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from largebatch.diagnostics.evaluation import Result

Number = float | torch.Tensor


def two_batch_estimates(
    small_sqnorm: Number, b_small: int, big_sqnorm: Number, b_big: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from one small- and one big-batch gradient norm."""
    if not 0 < b_small < b_big:
        raise ValueError(
            f"Invalid batch sizes: b_small={b_small}, b_big={b_big} (need 0 < b_small < b_big)"
        )
    small = torch.as_tensor(small_sqnorm, dtype=torch.float64)
    big = torch.as_tensor(big_sqnorm, dtype=torch.float64)
    grad_sqnorm = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return grad_sqnorm, trace


@dataclass
class NoiseScaleEstimate(Result):
    """The current B_simple and its (bias-corrected) averaged numerator and denominator.

    ``b_simple`` is NaN while the averaged ``|G|^2`` is not positive.
    """

    b_simple: float
    grad_sqnorm: float
    trace_covariance: float
    num_updates: int


class NoiseScaleTracker:
    """Moving averages of the two-batch estimates; call :meth:`update` every step.

    Args:
        decay: EMA factor per update (0.99 averages over about 100 steps). Both
            averages are bias-corrected as in Adam, which leaves their ratio unchanged.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"Invalid decay: {decay}")
        self.decay = decay
        self.num_updates = 0
        self._grad_sqnorm = torch.zeros((), dtype=torch.float64)
        self._trace = torch.zeros((), dtype=torch.float64)

    def update(self, small_sqnorm: Number, b_small: int, big_sqnorm: Number, b_big: int) -> None:
        """Fold in one step's squared norms of a ``b_small`` and a ``b_big`` gradient."""
        grad_sqnorm, trace = two_batch_estimates(small_sqnorm, b_small, big_sqnorm, b_big)
        self._grad_sqnorm = (
            self.decay * self._grad_sqnorm.to(grad_sqnorm) + (1 - self.decay) * grad_sqnorm
        )
        self._trace = self.decay * self._trace.to(trace) + (1 - self.decay) * trace
        self.num_updates += 1

    @property
    def b_simple(self) -> torch.Tensor:
        """``EMA(tr Sigma) / EMA(|G|^2)`` as a tensor (NaN while the denominator is not positive)."""
        return torch.where(self._grad_sqnorm > 0, self._trace / self._grad_sqnorm, torch.nan)

    def estimate(self) -> NoiseScaleEstimate:
        """The current values as floats (synchronises with the device)."""
        if self.num_updates == 0:
            raise RuntimeError("NoiseScaleTracker.estimate() called before any update()")
        correction = 1 - self.decay**self.num_updates
        return NoiseScaleEstimate(
            b_simple=self.b_simple.item(),
            grad_sqnorm=(self._grad_sqnorm / correction).item(),
            trace_covariance=(self._trace / correction).item(),
            num_updates=self.num_updates,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "grad_sqnorm": self._grad_sqnorm.clone(),
            "trace": self._trace.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self._grad_sqnorm = state["grad_sqnorm"].clone()
        self._trace = state["trace"].clone()


def gradient_sqnorm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """``sum |p.grad|^2`` over parameters that have a gradient (a tensor; no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        raise ValueError("Invalid parameters: none has a gradient")
    return torch.nn.utils.get_total_norm(grads).double() ** 2


class GradientNormRecorder:
    """Records local and averaged gradient squared norms inside DDP's all-reduce.

    Registers a communication hook on ``ddp_model`` that, for every gradient
    bucket, stores the squared norms of the rank's own (local-batch) gradients,
    averages the bucket across ranks exactly like DDP's default hook, and stores
    the squared norms of the result. Costs two reductions of data already in
    memory per bucket and no extra backward pass, and nothing while
    :attr:`recording` is ``False`` (the all-reduce alone). DDP takes one hook, so
    this replaces (and cannot be combined with) other hooks such as fp16 compression.

    Norms are taken per parameter and summed in the model's parameter order, so
    the result does not depend on how DDP groups parameters into buckets (it
    regroups them after the first step, and again after a resume): a resumed run
    reads bitwise the same numbers as an uninterrupted one.
    """

    def __init__(
        self,
        ddp_model: nn.parallel.DistributedDataParallel,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"Invalid model: expected DistributedDataParallel, got {type(ddp_model).__name__}"
            )
        self.process_group = process_group
        self.recording = True
        """Whether the next backward passes record norms (a training loop that measures
        every N steps switches it on for those steps only)."""
        # parameter -> its position in the model, which orders the sums
        self._position = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
        self._local: dict[int, torch.Tensor] = {}
        self._averaged: dict[int, torch.Tensor] = {}
        ddp_model.register_comm_hook(self, _record_and_allreduce)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local |g|^2 averaged over ranks, |averaged g|^2)`` since the last read.

        A collective (one scalar all-reduce): every rank must call it.
        """
        if not self._local or len(self._averaged) != len(self._local):
            raise RuntimeError(
                "GradientNormRecorder.read(): no synchronised backward since the last read"
            )
        local = torch.stack([self._local[i] for i in sorted(self._local)]).sum()
        averaged = torch.stack([self._averaged[i] for i in sorted(self._averaged)]).sum()
        self._local.clear()
        self._averaged.clear()
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        dist.all_reduce(local, group=group)
        return local / dist.get_world_size(group), averaged


def _sqnorms(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Squared norms (float64) of the consecutive pieces of ``flat`` of the given sizes."""
    norms = torch._foreach_norm(list(flat.split(sizes)), 2.0, dtype=torch.float64)
    return torch._foreach_pow(norms, 2.0)


def _record_and_allreduce(
    recorder: GradientNormRecorder, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: record each parameter's squared norm, average the bucket, record again."""
    if not recorder.recording:
        return allreduce_hook(recorder.process_group, bucket)
    positions = [recorder._position[id(p)] for p in bucket.parameters()]
    sizes = [g.numel() for g in bucket.gradients()]
    recorder._local.update(zip(positions, _sqnorms(bucket.buffer(), sizes)))

    def record_averaged(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        averaged = future.value()
        recorder._averaged.update(zip(positions, _sqnorms(averaged, sizes)))
        return averaged

    return allreduce_hook(recorder.process_group, bucket).then(record_averaged)
