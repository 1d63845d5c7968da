"""Batches for training and evaluation, read from the device when the data fit there.

Training data is one seeded permutation per epoch (``DistributedSampler``, also
with a single process), cut into global batches; each process takes its shard.
The stream's only state is how many global batches it has handed out, so a
checkpoint resumes mid-epoch exactly, and one process reading batch ``B`` sees
the same examples as two processes reading ``B / 2`` each.

On a GPU, :func:`place_task_data` copies a task's tensor data sets to the device
once, when they fit in :data:`DEVICE_MEMORY_SHARE` of its free memory. A batch
is then an index into device memory, with no copy from the host per step; the
permutation moves to the device once per epoch. Other data sets (and data that
do not fit) are gathered on the host and copied per batch, as a ``DataLoader``
would. The examples, and so the trained parameters, are the same either way.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset, default_collate

from largebatch.tasks.base import Task

Batch = tuple[torch.Tensor, torch.Tensor]

#: the share of a GPU's free memory that a run's data may take; the model, its
#: gradients, the optimizer's state and the activations need the rest
DEVICE_MEMORY_SHARE = 0.25


def fetch(dataset: Dataset, indices: torch.Tensor, device: torch.device) -> Batch:
    """The examples at ``indices`` (a 1-D integer tensor) as one batch on ``device``.

    Tensor datasets, the common case, are indexed in one call where their
    tensors live; subsets are mapped to their parent; any other dataset goes
    through ``default_collate``.
    """
    if isinstance(dataset, Subset):
        parent_indices = torch.as_tensor([dataset.indices[i] for i in indices.tolist()])
        return fetch(dataset.dataset, parent_indices, device)
    if isinstance(dataset, TensorDataset):
        rows = indices.to(dataset.tensors[0].device, non_blocking=True)
        inputs, targets = (t[rows] for t in dataset.tensors)
    else:
        inputs, targets = default_collate([dataset[i] for i in indices.tolist()])
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def index_device(dataset: Dataset) -> torch.device:
    """Where indices into ``dataset`` are best kept: with its tensors, else on the host."""
    if isinstance(dataset, TensorDataset) and dataset.tensors:
        return dataset.tensors[0].device
    return torch.device("cpu")


def example_tensors(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """All examples of a tensor dataset, or of (nested) subsets of one, in order; else None."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors
    if isinstance(dataset, Subset):
        parent = example_tensors(dataset.dataset)
        if parent is not None:
            rows = torch.as_tensor(dataset.indices, dtype=torch.long)
            return tuple(t[rows] for t in parent)
    return None


def place_task_data(task: Task, device: torch.device) -> Task:
    """``task`` with its tensor data sets copied to the GPU ``device`` where they fit.

    The budget is :data:`DEVICE_MEMORY_SHARE` of the device's free memory (see
    :func:`splits_within`); on the CPU ``task`` is returned as it is.
    """
    if device.type != "cuda":
        return task
    budget = DEVICE_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]
    placed = {
        split: TensorDataset(*(t.to(device) for t in tensors))
        for split, tensors in splits_within(task, budget).items()
    }
    return replace(task, **placed)


def splits_within(task: Task, budget: float) -> dict[str, tuple[torch.Tensor, ...]]:
    """The example tensors of the splits that fit in ``budget`` bytes together.

    Splits are taken in the order train, val, test, each if it fits in what the
    earlier ones left; data sets not made of tensors are left out.
    """
    chosen = {}
    for split in ("train", "val", "test"):
        dataset = getattr(task, split)
        tensors = example_tensors(dataset) if dataset is not None else None
        if tensors is None:
            continue
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size <= budget:
            chosen[split] = tensors
            budget -= size
    return chosen


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
        batches = self.at(self.position)
        self.position += 1
        return batches

    def at(self, position: int) -> list[Batch]:
        """The micro-batches of global batch ``position``, handed out or not (no state changes)."""
        epoch = position // self.batches_per_epoch
        if self._epoch != epoch:
            self._epoch = epoch
            self.sampler.set_epoch(epoch)
            order = torch.tensor(list(self.sampler))
            self._order = order.to(index_device(self.dataset), non_blocking=True)
        start = (position % self.batches_per_epoch) * self.local_batch_size
        m = self.micro_batch_size
        return [
            fetch(self.dataset, self._order[start + i * m : start + (i + 1) * m], self.device)
            for i in range(self.accumulation_steps)
        ]


def shard_batches(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, device: torch.device
):
    """This process's evaluation batches: examples ``rank, rank + world_size, ...`` in order."""
    indices = torch.arange(rank, len(dataset), world_size, device=index_device(dataset))
    for start in range(0, len(indices), batch_size):
        yield fetch(dataset, indices[start : start + batch_size], device)
