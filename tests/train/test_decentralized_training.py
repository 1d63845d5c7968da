"""Decentralized optimizers through ``train``: four gloo processes (started once), per-rank
checkpoints that resume bit for bit, evaluation at the ranks' average; and the checks that
reject a decentralized run before anything starts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from gloo_group import leave_group
from tiny_train_task import TINY_TASK, build, final_checkpoint, read_metrics

from largebatch.cli import main
from largebatch.diagnostics.evaluation import evaluate
from largebatch.optim import StepProtocol
from largebatch.optim.decentralized import DecentLaM
from largebatch.optim.decentralized.base import DecentralizedOptimizer
from largebatch.train import RunConfig, train
from largebatch.train.noise_scale import noise_scale_source
from largebatch.utils.errors import ConfigError, UnknownNameError

N = 4
KILLED_AT = 12  # the resumed run loses its step-12 checkpoint, as if killed after step 6's


def _config(out_root: Path, name: str, optimizer: str, topology: str, **fields) -> RunConfig:
    settings = dict(
        task=TINY_TASK, optimizer=optimizer, topology=topology, lr=0.05, batch_size=32,
        steps=12, warmup_steps=0, eval_every=4, checkpoint_every=6, nproc=N, device="cpu",
        out_dir=str(out_root / name),
    )  # fmt: skip
    return RunConfig(**(settings | fields))


def _worker(rank: int, port: int, out_root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(N),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name in ("uninterrupted", "resumed"):
        result = train(_config(out_root, name, "decentlam", "exp"))
        assert result.status == "done", result.error
    assert train(_config(out_root, "ring", "dmsgd", "ring")).status == "done"
    growing = _config(
        out_root, "growing", "decentlam", "exp", batch_growth="norm-test",
        batch_growth_theta=0.3, max_batch_size=64, schedule="constant",
    )  # fmt: skip
    assert train(growing).status == "done"
    slow = _config(out_root, "slowmo", "slowmo", "ring", optimizer_options={"slow_every": 4})
    assert train(slow).status == "done"
    dist.barrier()
    if rank == 0:  # as if killed after the step-6 checkpoint
        (out_root / "resumed" / "checkpoints" / f"step-{KILLED_AT:09d}.pt").unlink()
        (out_root / "resumed" / "result.json").unlink()
    dist.barrier()
    resumed = _config(out_root, "resumed", "decentlam", "exp", resume=True)
    steps = []  # the steps the resumed run takes: those after its step-6 checkpoint
    with patch.object(
        DecentLaM, "step", lambda self: steps.append(DecentralizedOptimizer.step(self))
    ):
        assert train(resumed).status == "done"
    (out_root / f"resumed-steps-{rank}.json").write_text(json.dumps(len(steps)))
    leave_group()  # no destroy_process_group: see tests/gloo_group.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out_root = tmp_path_factory.mktemp("decentralized")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, out_root), nprocs=N, start_method="fork")
    return out_root


def test_a_killed_four_process_run_resumes_bit_for_bit(runs):
    """Every rank's parameters and optimizer state, and every logged value but the clock;
    the resumed run took only the steps after its checkpoint."""
    assert [json.loads((runs / f"resumed-steps-{r}.json").read_text()) for r in range(N)] == [6] * N
    uninterrupted, resumed = (final_checkpoint(str(runs / n)) for n in ("uninterrupted", "resumed"))
    assert len(resumed["ranks"]) == N
    for mine, theirs in zip(resumed["ranks"], uninterrupted["ranks"]):
        for name, tensor in theirs["model"].items():
            assert torch.equal(mine["model"][name], tensor), name
        for index, state in theirs["optimizer"]["state"].items():
            assert torch.equal(
                mine["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]
            )
        assert mine["optimizer"]["state"][0]["gossip_round"] == KILLED_AT
    rows = [
        [{k: v for k, v in row.items() if k != "time"} for row in read_metrics(str(runs / n))]
        for n in ("uninterrupted", "resumed")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_ranks_differ_and_the_model_evaluated_is_their_average(runs):
    """No gradient was all-reduced (the ranks drift apart between gossip rounds); the checkpoint's
    model, and the model the final test loss was measured on, is the mean of the ranks'."""
    checkpoint = final_checkpoint(str(runs / "ring"))
    models = [rank["model"] for rank in checkpoint["ranks"]]
    for name, average in checkpoint["model"].items():
        stacked = torch.stack([model[name] for model in models])
        assert not torch.equal(stacked[0], stacked[1]), name
        torch.testing.assert_close(average, stacked.double().mean(0).float(), rtol=0, atol=1e-6)
    task = build()
    model = task.build_model()
    model.load_state_dict(checkpoint["model"])
    test = evaluate(model, task.loss_fn, [task.test[:]], task.metrics)
    result = json.loads((runs / "ring" / "result.json").read_text())
    assert result["final_test_loss"] == pytest.approx(test["loss"], rel=1e-5)
    own = task.build_model()
    own.load_state_dict(models[0])  # rank 0's own model scores differently
    assert evaluate(own, task.loss_fn, [task.test[:]], task.metrics)["loss"] != pytest.approx(
        test["loss"], rel=1e-5
    )


def test_a_growing_batch_leaves_the_gradients_local(runs):
    """The norm test on every step: its statistics pass (reduced across the ranks) does not
    stand in for the local gradients, which would keep the ranks identical; the batch grew."""
    checkpoint = final_checkpoint(str(runs / "growing"))
    first, second = (rank["model"] for rank in checkpoint["ranks"][:2])
    assert any(not torch.equal(first[name], second[name]) for name in first)
    extra = json.loads((runs / "growing" / "result.json").read_text())["extra"]
    assert extra["final_batch_size"] > 32


def test_slowmo_averages_every_fourth_step_and_logs_what_it_sends(runs):
    """Evaluated every 4 steps, right after each exact average: the ranks agree there
    (distance 0); per step 2 neighbours on the ring, plus every 4 steps one all-reduce of the
    parameters and the momentum (the nominal 2 (n-1)/n of 2 x the model), amortized."""
    rows = read_metrics(str(runs / "slowmo"))
    numel = sum(t.numel() for t in build().build_model().parameters())
    assert [float(row["consensus_distance"]) for row in rows] == [0.0] * 4
    amortized = 2 * numel * 4 + (2 * (N - 1) * 2 * numel * 4 // N) / 4
    assert all(float(row["gossip_bytes_per_step"]) == amortized for row in rows[1:])
    checkpoint = final_checkpoint(str(runs / "slowmo"))
    first, second = (rank["model"] for rank in checkpoint["ranks"][:2])
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_consensus_distance_and_bytes_per_step_are_logged(runs):
    """Distance 0 at the start (every rank starts from rank 0's parameters), then > 0; each
    step every rank sends its parameters (float32) to log2(4) = 2 neighbours."""
    rows = read_metrics(str(runs / "uninterrupted"))
    numel = sum(t.numel() for t in build().build_model().parameters())
    assert float(rows[0]["consensus_distance"]) == 0.0
    assert all(float(row["consensus_distance"]) > 0 for row in rows[1:])
    assert rows[0]["gossip_bytes_per_step"] == ""
    assert all(float(row["gossip_bytes_per_step"]) == 2 * numel * 4 for row in rows[1:])
    assert "noise_scale" not in rows[0]  # no global-batch gradient exists to measure it
    extra = json.loads((runs / "uninterrupted" / "result.json").read_text())["extra"]
    assert extra["gossip_bytes_per_step"] == 2 * numel * 4
    assert extra["consensus_distance"] == float(rows[-1]["consensus_distance"])


# --- rejected before anything starts (one process) --------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"optimizer": "decentlam"}, ConfigError, "Invalid world size for topology 'ring': 1"),
        # slowmo's default topology is its base's: DecentLaM's ring, not DmSGD's exp
        ({"optimizer": "slowmo", "optimizer_options": {"base": "decentlam"}}, ConfigError,
         "Invalid world size for topology 'ring': 1"),
        ({"optimizer": "dmsgd", "topology": "one-peer-exp", "nproc": 6, "batch_size": 60},
         ConfigError, "'one-peer-exp': 6 (it needs a power of two"),
        ({"optimizer": "dmsgd", "topology": "rings", "nproc": 2}, UnknownNameError,
         "Unknown topology 'rings'. Did you mean 'ring'"),
        ({"optimizer": "sgd", "topology": "ring", "nproc": 2}, ConfigError,
         "Invalid topology: 'ring' (optimizer 'sgd' averages gradients"),
        ({"optimizer": "dmsgd", "nproc": 2, "optimizer_options": {"topology": "ring"}},
         ConfigError, "Invalid optimizer option topology='ring'"),
        ({"optimizer": "e", "nproc": 2, "optimizer_options": {"base": "decentlam"}}, ConfigError,
         "Invalid base: 'decentlam' ('e' wraps an all-reduce optimizer)"),
        ({"optimizer": "slowmo", "nproc": 2, "optimizer_options": {"base": "sgd"}}, ConfigError,
         "Invalid base: 'sgd' ('slowmo' wraps a decentralized optimizer)"),
    ],
)  # fmt: skip
def test_a_bad_decentralized_config_is_refused_naming_the_value(fields, error, message):
    with pytest.raises(error) as raised:
        RunConfig(**fields)
    assert message in str(raised.value)


def test_the_noise_scale_cannot_be_asked_of_a_decentralized_optimizer():
    config = RunConfig(optimizer="decentlam", nproc=2, noise_scale=True)
    decentralized = StepProtocol(local_gradients=True)
    with pytest.raises(ConfigError, match="keeps each process's gradient local"):
        noise_scale_source(config, decentralized)
    assert noise_scale_source(RunConfig(optimizer="decentlam", nproc=2), decentralized) is None


def test_cli_rejects_a_one_process_decentralized_run_and_lists_topologies(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    args = ["run", "--task", TINY_TASK, "--optimizer", "decentlam", "--topology", "ring"]
    rejected = runner.invoke(main, [*args, "--steps", "2", "--out", str(out)])
    assert rejected.exit_code == 2
    assert "Invalid world size for topology 'ring': 1" in rejected.output
    assert not out.exists()
    listed = runner.invoke(main, ["list", "topologies"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in ("ring", "exp", "one-peer-exp", "complete"))
