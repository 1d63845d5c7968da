"""Inverse roots off the training thread.

A job reads a snapshot of the statistics taken at step ``t0`` and runs on one background
thread while training continues with the previous roots. The optimizer installs the
result at exactly step ``t0 + staleness``, waiting for the job only if it is not done by
then, so training is deterministic: the same as computing the snapshot's roots in the
main thread at step ``t0 + staleness`` (the synchronous mode, used for exact tests).

On CUDA the job runs on its own stream after an event recorded when the snapshot was
taken, and synchronises that stream before reporting completion.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def _on_side_stream(
    job: Callable[[], Any], ready: torch.cuda.Event, stream: torch.cuda.Stream
) -> Any:
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        result = job()
    stream.synchronize()
    return result


class RootWorker:
    """One background thread running root jobs in submission order, keyed by parameter group."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._jobs: dict[int, Future] = {}

    def submit(self, key: int, job: Callable[[], Any], device: torch.device) -> None:
        """Start ``job`` (which reads tensors on ``device`` written before this call)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shampoo-roots")
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
            stream = self._streams.setdefault(device, torch.cuda.Stream(device))
            self._jobs[key] = self._executor.submit(_on_side_stream, job, ready, stream)
        else:
            self._jobs[key] = self._executor.submit(job)

    def has_job(self, key: int) -> bool:
        return key in self._jobs

    def result(self, key: int) -> Any:
        """Wait for job ``key`` and return its result."""
        return self._jobs.pop(key).result()

    def discard_all(self) -> None:
        """Wait for every job and drop its result (the state they were computed for is gone)."""
        for future in self._jobs.values():
            future.exception()
        self._jobs.clear()
