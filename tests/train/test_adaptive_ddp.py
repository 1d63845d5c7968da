"""AutoWU and AdaScale with two gloo processes: one decision (rank 0's), the same rates on both."""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import leave_group
from tiny_train_task import TINY_TASK

from largebatch.train import RunConfig, distributed, train
from largebatch.train import autowu as autowu_module
from largebatch.train.autowu import AutoWU, AutoWUSchedule, MinimumTest
from largebatch.train.distributed import Distributed

SCHEDULE = dict(total_steps=240, steps_per_epoch=12, warmup_steps=120, min_lr=1e-5, max_lr=1.0)


def _curve(rate: float) -> float:
    return 1 + 0.3 * math.log10(rate / 1e-3) ** 2


def _local_loss(rate: float, rng: np.random.Generator) -> torch.Tensor:
    return torch.tensor(_curve(rate) + 0.05 * rng.normal(), dtype=torch.float32)


def _feed(scheduler: AutoWU, optimizer, mean_loss) -> list[float]:
    rates = []
    for _ in range(SCHEDULE["total_steps"]):
        rate = optimizer.param_groups[0]["lr"]
        rates.append(rate)
        loss = mean_loss(rate)
        optimizer.step()
        scheduler.step(loss)
    return rates


def _scheduler(ddp: Distributed | None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return optimizer, AutoWU(optimizer, AutoWUSchedule(**SCHEDULE), ddp)


def _runs(out_root: Path) -> list[RunConfig]:
    common = dict(task=TINY_TASK, optimizer="sgd", batch_size=16, nproc=2, eval_every=8)
    return [
        RunConfig(**common, schedule="autowu", autowu_min_lr=1e-4, autowu_max_lr=100.0,
                  steps=64, out_dir=str(out_root / "autowu")),
        RunConfig(**common, lr=0.05, base_batch_size=4, scaling="adascale", warmup_steps=0,
                  steps=16, out_dir=str(out_root / "adascale")),
    ]  # fmt: skip


def _worker(rank: int, port: int, out_root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if rank == 1:  # this rank's own test would switch at once: it must follow rank 0
        autowu_module.minimum_test = lambda *args: MinimumTest(True, (1.0,) * 5, (0.0,) * 5)
    ddp = Distributed(True, rank, 2, torch.device("cpu"), False)
    optimizer, scheduler = _scheduler(ddp)
    rng = np.random.default_rng(rank)  # each rank its own loss, averaged across ranks
    rates = _feed(
        scheduler,
        optimizer,
        lambda rate: distributed.all_reduce_mean(_local_loss(rate, rng), ddp),
    )
    record = {"rates": rates, "switch": scheduler.switch_step, "peak": scheduler.peak_lr}
    record["runs"] = [train(config).to_dict() for config in _runs(out_root)]
    (out_root / f"rank{rank}.json").write_text(json.dumps(record))
    leave_group()  # no destroy_process_group: see tests/gloo_group.py


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_root = tmp_path_factory.mktemp("adaptive-ddp")
    importlib.import_module("torch._dynamo")  # DDP imports it: once here, not in each fork
    mp.start_processes(_worker, args=(_free_port(), out_root), nprocs=2, start_method="fork")
    return [json.loads((out_root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_autowu_decides_on_rank_zero_from_the_averaged_loss(two_ranks):
    """Both ranks follow rank 0's test (rank 1's would have switched after 3 epochs), and the
    rates are bitwise those of one process fed the same averaged losses."""
    rngs = [np.random.default_rng(r) for r in (0, 1)]

    def averaged(rate: float) -> torch.Tensor:
        return (_local_loss(rate, rngs[0]) + _local_loss(rate, rngs[1])) / 2

    optimizer, reference = _scheduler(None)
    expected = _feed(reference, optimizer, averaged)
    assert reference.switch_reason == "test"
    assert reference.switch_step > 3 * SCHEDULE["steps_per_epoch"]
    for record in two_ranks:
        assert record["rates"] == expected
        assert (record["switch"], record["peak"]) == (reference.switch_step, reference.peak_lr)


def test_training_loop_runs_autowu_and_adascale_on_two_processes(two_ranks):
    """In the loop, too, both ranks end with the same switch, gain and progress."""
    autowu, adascale = (run for run in two_ranks[0]["runs"])
    for mine, theirs in zip(two_ranks[0]["runs"], two_ranks[1]["runs"]):
        # AutoWU's warm-up overshoots on purpose (max_lr 100): chance level is an outcome too
        assert mine["status"] == theirs["status"] in ("done", "chance")
        for key, value in mine["extra"].items():
            if key.startswith(("autowu", "adascale", "scale_invariant")):
                assert theirs["extra"][key] == value, key
    assert autowu["extra"]["autowu_tests"] >= 1
    assert 1.0 <= adascale["extra"]["adascale_gain"] <= 4.0  # S = 16 / 4
    assert adascale["extra"]["scale_invariant_steps"] >= 4 * 16
