"""Batches for training and evaluation.

Training data is one seeded permutation per epoch (``DistributedSampler``, also
with a single process), cut into global batches; each process takes its shard.
The stream's only state is how many global batches it has handed out, so a
checkpoint resumes mid-epoch exactly, and one process reading batch ``B`` sees
the same examples as two processes reading ``B / 2`` each.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset, default_collate

Batch = tuple[torch.Tensor, torch.Tensor]


def fetch(dataset: Dataset, indices: torch.Tensor, device: torch.device) -> Batch:
    """The examples at ``indices`` (a 1-D integer tensor) as one batch on ``device``.

    Tensor datasets, the common case, are indexed in one call; subsets are
    mapped to their parent; any other dataset goes through ``default_collate``.
    """
    if isinstance(dataset, Subset):
        parent_indices = torch.as_tensor([dataset.indices[i] for i in indices.tolist()])
        return fetch(dataset.dataset, parent_indices, device)
    if isinstance(dataset, TensorDataset):
        inputs, targets = (t[indices] for t in dataset.tensors)
    else:
        inputs, targets = default_collate([dataset[i] for i in indices.tolist()])
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


class BatchStream:
    """This process's share of consecutive global batches, epoch after epoch.

    Each call to :meth:`next` returns the ``accumulation_steps`` micro-batches
    (of ``micro_batch_size`` examples each) that make up this process's part of
    the next global batch. Incomplete global batches at the end of an epoch are
    dropped, so every step sees the same number of examples.

    Args:
        position: global batches already handed out (to resume).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: DistributedSampler,
        micro_batch_size: int,
        accumulation_steps: int,
        device: torch.device,
        position: int = 0,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.device = device
        self.local_batch_size = micro_batch_size * accumulation_steps
        self.batches_per_epoch = len(sampler) // self.local_batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"Invalid batch size: {self.local_batch_size} examples per process "
                f"exceed the {len(sampler)} examples of each process's shard"
            )
        self.position = position
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def next(self) -> list[Batch]:
        """The micro-batches of the next global batch (this process's share)."""
        if self._epoch != self.epoch:
            self._epoch = self.epoch
            self.sampler.set_epoch(self._epoch)
            self._order = torch.tensor(list(self.sampler))
        start = (self.position % self.batches_per_epoch) * self.local_batch_size
        self.position += 1
        m = self.micro_batch_size
        return [
            fetch(self.dataset, self._order[start + i * m : start + (i + 1) * m], self.device)
            for i in range(self.accumulation_steps)
        ]


def shard_batches(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, device: torch.device
):
    """This process's evaluation batches: examples ``rank, rank + world_size, ...`` in order."""
    indices = torch.arange(rank, len(dataset), world_size)
    for start in range(0, len(indices), batch_size):
        yield fetch(dataset, indices[start : start + batch_size], device)
