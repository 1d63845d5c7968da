"""Batches for training and evaluation.

Training data is one seeded permutation per epoch (``DistributedSampler``, also
with a single process), cut into consecutive global batches; each process takes
its shard. The stream's state is where it stands in which epoch, so a
checkpoint resumes mid-epoch exactly, and one process reading batch ``B`` sees
the same examples as two processes reading ``B / 2`` each. Batches may change
size from one step to the next (a batch-size controller): a batch that does not
fit in the rest of the epoch starts the next one.

The stream also serves the classical methods' other reads: the whole training
set (an SVRG snapshot), the indices of the last batch (SAGA's table) and an
independent sample keyed by the step (SQN's Hessian sample).
"""

from __future__ import annotations

from collections.abc import Iterator

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
        """Indices (in ``dataset``) of this process's examples in the last batch."""
        self._loaded_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self.position = position

    def _check(self, batch_size: int) -> int:
        """This process's share of a global batch of ``batch_size`` examples."""
        local = batch_size // self.world_size
        if local * self.world_size != batch_size or local % self.accumulation_steps:
            raise ValueError(
                f"Invalid batch size: {batch_size} is not divisible by processes x accumulation "
                f"steps = {self.world_size} x {self.accumulation_steps}"
            )
        if not 1 <= local <= self.shard_size:
            raise ValueError(
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
        if self._loaded_epoch != self.epoch:
            self._loaded_epoch = self.epoch
            self.sampler.set_epoch(self.epoch)
            self._order = torch.tensor(list(self.sampler))
        self.indices = self._order[self.offset : self.offset + local]
        self.offset += local
        self.batches += 1
        self.examples += batch_size
        if self.offset + self.batch_size // self.world_size > self.shard_size:
            self.epoch, self.offset = self.epoch + 1, 0  # a default batch no longer fits
        m = local // self.accumulation_steps
        return [
            fetch(self.dataset, self.indices[i * m : (i + 1) * m], self.device)
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
    indices = torch.arange(rank, len(dataset), world_size)
    for start in range(0, len(indices), batch_size):
        yield fetch(dataset, indices[start : start + batch_size], device)
