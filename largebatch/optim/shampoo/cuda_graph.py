"""Replaying a partition's steady-state Shampoo step as a CUDA graph.

On CUDA a Shampoo step is a few hundred small kernels, and launched one by one from Python
their launch cost exceeds their run time. Once a partition's step has settled (the same
parameters have gradients, every unit takes the same scalars, no root refresh is due), it
is run once eagerly on a side stream (the warm-up CUDA graphs need), then captured and
replayed. Before each replay the gradients are copied into the partition's gradient buffer
(outside the graph: ``p.grad`` is a new tensor after ``zero_grad``) and the step's scalars
(learning rate, bias corrections, ...) into a small device tensor the graph reads. A change
to anything the graph bakes in (a hyperparameter the control flow depends on, the
preconditioning phase, the set of parameters with gradients, a parameter's storage) warms
up and captures a new graph. Root refreshes, and steps in which parameters with different
step counts (one joined late or skipped steps) differ in their bias corrections, run
eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.optim.shampoo.layout import Partition
from largebatch.optim.shampoo.scalars import StepScalars

Body = Callable[[StepScalars], None]


@dataclass
class Captured:
    """A captured step: what it was captured for, the scalars tensor it reads, and its launch."""

    fingerprint: Hashable
    scalars: Tensor
    launch: Callable[[], None]

    def replay(self, scalars: StepScalars) -> None:
        host = torch.tensor(scalars.values(), dtype=self.scalars.dtype)
        if self.scalars.is_cuda:
            host = host.pin_memory()  # an asynchronous copy, kept alive by the host allocator
        self.scalars.copy_(host, non_blocking=True)
        self.launch()


class StepGraphs:
    """The captured steps of every partition (see the module docstring)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._captured: dict[Partition, Captured] = {}
        self._warm: dict[Partition, Hashable] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def eligible(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether steps on ``device`` with parameters of ``dtype`` may be replayed.

        Half-precision parameters are left eager: their scalars would be rounded to their
        dtype in the graph.
        """
        return self.enabled and device.type == "cuda" and dtype in (torch.float32, torch.float64)

    def run(
        self,
        partition: Partition,
        fingerprint: Hashable,
        body: Body,
        scalars: StepScalars,
        can_capture: bool,
    ) -> None:
        """Run the step: replay its graph, or capture one, or run it eagerly as the warm-up."""
        captured = self._captured.get(partition)
        if captured is not None and captured.fingerprint == fingerprint:
            captured.replay(scalars)
            return
        if self._warm.get(partition) == fingerprint and can_capture:
            captured = self._capture(fingerprint, body, scalars, partition)
            self._captured[partition] = captured
            captured.replay(scalars)
            return
        self._warm[partition] = fingerprint
        with self._side_stream(partition.device):
            body(scalars)

    def _capture(
        self, fingerprint: Hashable, body: Body, scalars: StepScalars, partition: Partition
    ) -> Captured:
        device = partition.device
        values = torch.tensor(scalars.values(), dtype=partition.dtype, device=device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the root worker's thread may be launching kernels meanwhile.
        with torch.cuda.graph(
            graph, stream=self._stream(device), capture_error_mode="thread_local"
        ):
            body(StepScalars.views_of(values))
        return Captured(fingerprint, values, graph.replay)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @contextlib.contextmanager
    def _side_stream(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        stream, current = self._stream(device), torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield
        current.wait_stream(stream)
