"""Batches for training and evaluation, read from the device when the data fit there.

Training data is one seeded permutation per epoch (``DistributedSampler``, also
with a single process), cut into consecutive global batches; each process takes
its shard. The stream's state is where it stands in which epoch, so a
checkpoint resumes mid-epoch exactly, and one process reading batch ``B`` sees
the same examples as two processes reading ``B / 2`` each. Batches may change
size from one step to the next (a batch-size controller): a batch that does not
fit in the rest of the epoch starts the next one. Any batch handed out can be
read again from its :class:`BatchAt` (a divergence report re-reads a step's).

The stream also serves the classical methods' other reads: the whole training
set (an SVRG snapshot), the indices of the last batch (SAGA's table) and an
independent sample keyed by the step (SQN's Hessian sample).

On a GPU, :func:`place_task_data` copies a task's tensor data sets to the device
once, when they fit in :data:`DEVICE_MEMORY_SHARE` of its free memory. A batch
is then an index into device memory, with no copy from the host per step; the
permutation moves to the device once per epoch. Other data sets (and data that
do not fit) are gathered on the host and copied per batch, as a ``DataLoader``
would. The examples, and so the trained parameters, are the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset, default_collate

from largebatch.tasks.base import Task
from largebatch.utils.errors import ConfigError

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


@dataclass(frozen=True)
class BatchAt:
    """Where a global batch lies: this process's share is examples ``offset`` to
    ``offset + size`` of its shard in epoch ``epoch``'s order (the same on every process)."""

    epoch: int
    offset: int
    size: int


class BatchStream:
    """This process's share of consecutive global batches, epoch after epoch.

    Each call to :meth:`next` returns the ``accumulation_steps`` micro-batches
    that make up this process's part of the next global batch (``batch_size``
    examples, by default the stream's own: ``micro_batch_size x
    accumulation_steps x processes``). A batch that does not fit in what is left
    of the epoch starts the next epoch (the rest is dropped), so every step sees
    the examples it asks for; a stream of fixed-size batches drops each epoch's
    incomplete last batch.

    Args:
        position: global batches of the default size already handed out (to resume).
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
        self.accumulation_steps = accumulation_steps
        self.device = device
        self.world_size, self.rank = sampler.num_replicas, sampler.rank
        self.shard_size = len(sampler)
        self.batch_size = micro_batch_size * accumulation_steps * self.world_size
        self.batches_per_epoch = self.shard_size // (micro_batch_size * accumulation_steps)
        self._check(self.batch_size)
        self.indices = torch.empty(0, dtype=torch.long)
        """Indices (in ``dataset``, on the host) of this process's examples in the last batch."""
        self.last: BatchAt | None = None
        """Where the last batch handed out lies."""
        self._loaded_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)  # the epoch's order, on the host
        self._rows = self._order  # the same, where the data are
        self.position = position

    def _check(self, batch_size: int) -> int:
        """This process's share of a global batch of ``batch_size`` examples."""
        local = batch_size // self.world_size
        if local * self.world_size != batch_size or local % self.accumulation_steps:
            raise ConfigError(
                f"Invalid batch size: {batch_size} is not divisible by processes x accumulation "
                f"steps = {self.world_size} x {self.accumulation_steps}"
            )
        if not 1 <= local <= self.shard_size:
            raise ConfigError(
                f"Invalid batch size: {local} examples per process "
                f"exceed the {self.shard_size} examples of each process's shard"
            )
        return local

    @property
    def num_examples(self) -> int:
        """The size of the training set (all processes)."""
        return len(self.dataset)

    @property
    def position(self) -> int:
        """Global batches handed out."""
        return self.batches

    @position.setter
    def position(self, batches: int) -> None:
        """Stand where a stream of default-size batches stands after ``batches`` of them."""
        self.epoch, rest = divmod(batches, self.batches_per_epoch)
        self.offset = rest * (self.batch_size // self.world_size)
        self.batches, self.examples = batches, batches * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: epoch, offset in this process's shard, batches and examples."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "batches": self.batches,
            "examples": self.examples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.batches, self.examples = state["batches"], state["examples"]

    def next(self, batch_size: int | None = None) -> list[Batch]:
        """The micro-batches of the next global batch (this process's share)."""
        batch_size = self.batch_size if batch_size is None else batch_size
        local = self._check(batch_size)
        if self.offset + local > self.shard_size:
            self.epoch, self.offset = self.epoch + 1, 0
        self.last = BatchAt(self.epoch, self.offset, local)
        batches = self.at(self.last)
        self.indices = self._order[self.offset : self.offset + local]
        self.offset += local
        self.batches += 1
        self.examples += batch_size
        if self.offset + self.batch_size // self.world_size > self.shard_size:
            self.epoch, self.offset = self.epoch + 1, 0  # a default batch no longer fits
        return batches

    def at(self, where: BatchAt) -> list[Batch]:
        """The micro-batches of the batch at ``where``, handed out or not (the stream stays)."""
        if self._loaded_epoch != where.epoch:
            self._loaded_epoch = where.epoch
            self.sampler.set_epoch(where.epoch)
            self._order = torch.tensor(list(self.sampler))
            self._rows = self._order.to(index_device(self.dataset), non_blocking=True)
        rows = self._rows[where.offset : where.offset + where.size]
        m = where.size // self.accumulation_steps
        return [
            fetch(self.dataset, rows[i * m : (i + 1) * m], self.device)
            for i in range(self.accumulation_steps)
        ]

    def full_pass(self, batch_size: int) -> Iterator[Batch]:
        """This process's share of the whole training set, in batches of ``batch_size``."""
        return shard_batches(self.dataset, batch_size, self.rank, self.world_size, self.device)

    def sample(self, size: int) -> Batch:
        """This process's share of ``size`` examples drawn without replacement, independently
        of the batches; the same for a given step of the same seed (so resumes are exact)."""
        generator = torch.Generator().manual_seed((self.sampler.seed + 1) * 2**40 + self.batches)
        chosen = torch.randperm(len(self.dataset), generator=generator)[:size]
        return fetch(self.dataset, chosen[self.rank :: self.world_size], self.device)


def shard_batches(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, device: torch.device
) -> Iterator[Batch]:
    """This process's evaluation batches: examples ``rank, rank + world_size, ...`` in order."""
    indices = torch.arange(rank, len(dataset), world_size, device=index_device(dataset))
    for start in range(0, len(indices), batch_size):
        yield fetch(dataset, indices[start : start + batch_size], device)
