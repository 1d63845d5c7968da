"""Training batches: sharding across processes, epochs, resuming, and dataset kinds."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

from largebatch.tasks import Task
from largebatch.train.data import (
    BatchStream,
    example_tensors,
    fetch,
    place_task_data,
    shard_batches,
    splits_within,
)

CPU = torch.device("cpu")
DATA = TensorDataset(torch.arange(50).float()[:, None], torch.arange(50))


def _stream(world_size: int = 1, rank: int = 0, micro: int = 8, steps: int = 1, position=0):
    sampler = DistributedSampler(DATA, world_size, rank, shuffle=True, seed=3, drop_last=True)
    return BatchStream(DATA, sampler, micro, steps, CPU, position=position)


def _ids(batches) -> list[int]:
    return [int(i) for _, targets in batches for i in targets]


def test_two_shards_together_read_the_one_process_batch():
    one = _stream(world_size=1, micro=8)
    shards = [_stream(world_size=2, rank=r, micro=4) for r in (0, 1)]
    for _ in range(12):  # two epochs of 6 batches (50 examples, the last 2 dropped)
        whole = _ids(one.next())
        parts = [_ids(s.next()) for s in shards]
        assert sorted(whole) == sorted(parts[0] + parts[1])


def test_epochs_cover_distinct_examples_and_reshuffle():
    stream = _stream(micro=4, steps=2)  # 8 examples per global batch, 6 per epoch
    first = [i for _ in range(6) for i in _ids(stream.next())]
    second = [i for _ in range(6) for i in _ids(stream.next())]
    assert len(set(first)) == len(first) == 48
    assert first != second and stream.epoch == 2


def test_resuming_at_a_position_reads_the_same_batches():
    continued = _stream(micro=8)
    for _ in range(8):
        continued.next()
    resumed = _stream(micro=8, position=8)
    for _ in range(5):
        assert _ids(resumed.next()) == _ids(continued.next())


class ListDataset(Dataset):
    def __len__(self):
        return len(DATA)

    def __getitem__(self, i):
        return DATA[i]


def test_fetch_agrees_across_dataset_kinds():
    indices = torch.tensor([7, 3, 11])
    expected = fetch(DATA, indices, CPU)
    subset = Subset(DATA, list(range(2, 50)))
    for dataset, rows in ((ListDataset(), indices), (subset, indices - 2)):
        got = fetch(dataset, rows, CPU)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_evaluation_shards_cover_every_example_once():
    seen = [i for rank in (0, 1, 2) for i in _ids(shard_batches(DATA, 7, rank, 3, CPU))]
    assert sorted(seen) == list(range(50))


def test_example_tensors_of_nested_subsets_are_the_fetched_examples():
    nested = Subset(Subset(DATA, list(range(5, 45))), [3, 0, 17, 39])
    inputs, targets = example_tensors(nested)
    expected = fetch(nested, torch.arange(4), CPU)
    assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    assert targets.tolist() == [8, 5, 22, 44]
    assert example_tensors(ListDataset()) is None  # not made of tensors: fetched per batch


def test_splits_are_placed_in_order_while_the_budget_lasts():
    train = TensorDataset(torch.zeros(10, 4), torch.zeros(10, dtype=torch.long))  # 240 bytes
    test = TensorDataset(torch.zeros(5, 4), torch.zeros(5, dtype=torch.long))  # 120 bytes
    task = Task("t", train=train, test=test, build_model=None, loss_fn=None)
    assert list(splits_within(task, 360)) == ["train", "test"]
    assert list(splits_within(task, 359)) == ["train"]
    assert list(splits_within(task, 239)) == ["test"]
    assert splits_within(task, 119) == {}
    with_list = Task("t", train=ListDataset(), test=test, build_model=None, loss_fn=None)
    assert list(splits_within(with_list, 1e9)) == ["test"]
    assert place_task_data(task, CPU) is task  # the CPU is where the data already are


def test_any_batch_can_be_read_again():
    """``at`` (divergence reports re-read a step's batch) agrees with the stream, in any epoch
    and whatever the batch sizes, and leaves the stream where it was."""
    stream = _stream(micro=4, steps=2)
    sizes = [None] * 14 + [16, 8, 24, 8, 32, 16]  # two epochs and a bit, then growing batches
    seen = [(_ids(stream.next(size)), stream.last) for size in sizes]
    assert len({where.epoch for _, where in seen}) >= 4
    for position in (12, 0, 7, 13, 3, 16, 19, 14):
        ids, where = seen[position]
        assert _ids(stream.at(where)) == ids
    assert stream.position == len(sizes)
    state = stream.state_dict()
    assert _ids(stream.next()) == _ids(_resumed(state).next())
    assert _ids(_stream(micro=4, steps=2, position=14).at(seen[14][1])) == seen[14][0]


def _resumed(state: dict) -> BatchStream:
    stream = _stream(micro=4, steps=2)
    stream.load_state_dict(state)
    return stream
