"""Each step's training loss, kept on the device until the loop reads them all at once.

Reading a loss on the host (``loss.item()``) makes the host wait until the
device has finished the step, so it cannot queue the next step meanwhile: on a
GPU a small model's step then costs the whole round trip instead of its kernels
alone (and, with data parallelism, an all-reduce more). The loop instead copies
each step's loss into a device buffer (one kernel, no wait) and reads the
buffer at evaluations, at checkpoints and whenever it is full: one all-reduce
and one copy to the host for all the steps since the last read. The values are
those the loop used to read step by step (the loss averaged over processes),
so the metrics and the resumed runs are unchanged; a non-finite loss is noticed
when it is read, at most :data:`CAPACITY` steps late.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from largebatch.train import distributed
from largebatch.train.data import BatchAt
from largebatch.train.distributed import Distributed

#: steps between reads at most: a read waits for the device once, which over 100
#: steps costs little even when a step is only a few kernel launches
CAPACITY = 100


@dataclass(frozen=True)
class StepLoss:
    """The training loss of optimizer step ``step`` (1-based), whose first global
    batch lies at ``batch`` in the data stream."""

    step: int
    batch: BatchAt
    value: float


class StepLosses:
    """A device buffer of the training losses of the steps since the last :meth:`read`."""

    def __init__(self, ddp: Distributed, capacity: int = CAPACITY) -> None:
        self.ddp = ddp
        self._values = torch.empty(capacity, dtype=torch.float32, device=ddp.device)
        self._steps: list[tuple[int, BatchAt]] = []

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) == len(self._values)

    def append(self, step: int, batch: BatchAt, loss: torch.Tensor) -> None:
        """Keep step ``step``'s ``loss`` (a 0-dim tensor on the device) without reading it."""
        if self.full:
            raise RuntimeError(f"StepLosses holds {len(self)} losses: read them first")
        self._values[len(self._steps)].copy_(loss.detach())
        self._steps.append((step, batch))

    def read(self, all_processes: bool = True) -> list[StepLoss]:
        """The losses since the last read, oldest first, as host floats; empties the buffer.

        ``all_processes``: averaged over the processes (a collective: every process
        reads at the same step), else this process's own (safe where another
        process may have failed).
        """
        values = self._values[: len(self._steps)]
        if all_processes:
            distributed.all_reduce_mean(values, self.ddp)
        losses = [StepLoss(s, b, v) for (s, b), v in zip(self._steps, values.tolist())]
        self._steps.clear()
        return losses
