"""Two gloo processes end where one process with the same global batch ends."""

from __future__ import annotations

import importlib
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from gloo_group import leave_group
from tiny_train_task import (
    PROBE_SPEC,
    TINY_TASK,
    assert_same_params,
    final_checkpoint,
    read_metrics,
)

from largebatch.cli.run import run
from largebatch.optim import registry
from largebatch.train import RunConfig, train

HERE = Path(__file__).parent
OPTIMIZERS = {
    "sgd": {"momentum": 0.9},
    "adamw": {},
    "lamb": {},
    # closure on the same batch, first gradient kept local to each process (SAM-style)
    "protocol-probe": {"closure": "same", "local_first_gradient": True},
}


#: the classical methods' reductions: an SVRG snapshot's full pass, Newton-CG's Hessian
#: sub-sample (each process's first examples), SQN's independent Hessian sample (sharded),
#: a growing batch's statistics (and its mean gradient, the cheap path)
CLASSICAL = {
    "svrg": dict(optimizer="svrg", optimizer_options={"inner_steps": 3}, lr=0.05),
    "newton-cg": dict(
        optimizer="newton-cg", optimizer_options={"weight_decay": 1e-2}, hessian_batch_size=8
    ),
    "sqn": dict(optimizer="sqn", optimizer_options={"update_every": 2}, hessian_batch_size=64),
    "norm-test": dict(
        optimizer="sgd", lr=0.05, batch_growth="norm-test", batch_growth_theta=0.3,
        max_batch_size=64, schedule="constant",
    ),
}  # fmt: skip


def _config(out_root: Path, optimizer: str, nproc: int) -> RunConfig:
    fields = CLASSICAL.get(optimizer) or dict(
        optimizer=optimizer,
        optimizer_options=OPTIMIZERS[optimizer],
        lr=0.05 if optimizer in ("sgd", "protocol-probe") else 0.01,
    )
    return RunConfig(
        task=TINY_TASK, batch_size=32, accumulation_steps=2, steps=6, warmup_steps=2,
        eval_every=3, nproc=nproc, out_dir=str(out_root / f"{optimizer}-{nproc}"), **fields,
    )  # fmt: skip


def _quiet_config(out_root: Path) -> RunConfig:
    """The two-process SGD run without noise-scale logging (on by default under DDP)."""
    config = _config(out_root, "sgd", nproc=2)
    return replace(config, noise_scale=False, out_dir=config.out_dir + "-quiet")


def _resume_config(out_root: Path, name: str, resume: bool = False) -> RunConfig:
    """Two processes measuring the noise scale on every step, checkpointing at step 6 of 12."""
    return RunConfig(
        task=TINY_TASK, optimizer="sgd", lr=0.05, batch_size=32, steps=12, warmup_steps=0,
        eval_every=4, checkpoint_every=6, noise_scale_every=1, nproc=2, resume=resume,
        out_dir=str(out_root / name),
    )  # fmt: skip


def _interrupted_and_resumed(out_root: Path, rank: int) -> None:
    """The resume run: trained to the end, cut back to its step-6 checkpoint, resumed."""
    assert train(_resume_config(out_root, "uninterrupted")).status == "done"
    assert train(_resume_config(out_root, "resumed")).status == "done"
    dist.barrier()
    if rank == 0:  # as if killed after the step-6 checkpoint
        (out_root / "resumed" / "checkpoints" / "step-000000012.pt").unlink()
        (out_root / "resumed" / "result.json").unlink()
    dist.barrier()
    assert train(_resume_config(out_root, "resumed", resume=True)).status == "done"


def _worker(rank: int, port: int, out_root: Path, optimizers: list[str]) -> None:
    """One of two processes, set up as a launcher would, running every optimizer in turn."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    registry._REGISTRY.setdefault(PROBE_SPEC.name, PROBE_SPEC)
    dist.init_process_group("gloo")
    configs = [_config(out_root, optimizer, nproc=2) for optimizer in optimizers]
    for config in [*configs, _quiet_config(out_root)]:
        result = train(config)
        assert result.status == "done", result.error
    _interrupted_and_resumed(out_root, rank)
    leave_group()  # no destroy_process_group: see tests/gloo_group.py


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Every optimizer trained once by two gloo processes (one launch for all)."""
    out_root = tmp_path_factory.mktemp("ddp")
    optimizers = [*OPTIMIZERS, *CLASSICAL]
    importlib.import_module("torch._dynamo")  # DDP imports it: once here, not in each fork
    mp.start_processes(
        _worker, args=(_free_port(), out_root, optimizers), nprocs=2, start_method="fork"
    )
    return out_root


@pytest.mark.usefixtures("probe_registered")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_processes_match_one_process(two_process_runs, tmp_path, optimizer):
    single = train(_config(tmp_path, optimizer, nproc=1))
    assert single.status == "done"
    two = final_checkpoint(_config(two_process_runs, optimizer, nproc=2).out_dir)
    one = final_checkpoint(single_dir := _config(tmp_path, optimizer, nproc=1).out_dir)
    assert_same_params(two["model"], one["model"], atol=1e-5)
    assert two["progress"]["last_eval"]["test"]["loss"] == pytest.approx(
        one["progress"]["last_eval"]["test"]["loss"], abs=1e-5
    )
    if optimizer == "protocol-probe":
        # rank 0's pre-step gradient stayed local; the closure's was averaged over both ranks
        probe_two = two["optimizer"]["state"][0]
        probe_one = final_checkpoint(single_dir)["optimizer"]["state"][0]
        assert not torch.allclose(probe_two["first_grad"], probe_two["closure_grad"], atol=1e-4)
        torch.testing.assert_close(probe_two["closure_grad"], probe_one["closure_grad"])
        torch.testing.assert_close(probe_one["first_grad"], probe_one["closure_grad"])


@pytest.mark.parametrize("case", CLASSICAL)
def test_classical_methods_in_two_processes_match_one_process(two_process_runs, tmp_path, case):
    single = train(_config(tmp_path, case, nproc=1))
    assert single.status == "done", single.error
    two = final_checkpoint(_config(two_process_runs, case, nproc=2).out_dir)
    one = final_checkpoint(_config(tmp_path, case, nproc=1).out_dir)
    assert_same_params(two["model"], one["model"], atol=1e-5)
    assert two["progress"]["example_gradients"] == one["progress"]["example_gradients"]
    if case == "norm-test":  # the same batch sizes, step by step: the batch did grow
        assert two["batch_growth"]["changes"] == one["batch_growth"]["changes"]
        assert len(one["batch_growth"]["changes"]) > 1


def test_noise_scale_is_logged_under_ddp_and_changes_nothing(two_process_runs):
    """The comm hook reads the per-process and averaged gradient norms; parameters are bitwise
    those of the run without it."""
    logged = _config(two_process_runs, "sgd", nproc=2).out_dir
    quiet = _quiet_config(two_process_runs).out_dir
    logged_params, quiet_params = (final_checkpoint(d)["model"] for d in (logged, quiet))
    for name in logged_params:
        assert torch.equal(logged_params[name], quiet_params[name]), name
    values = [float(row["noise_scale_ema"]) for row in read_metrics(logged)[1:]]
    assert len(values) == 2 and all(v > 0 for v in values)
    result = json.loads((Path(logged) / "result.json").read_text())
    assert result["extra"]["noise_scale"] == values[-1]
    assert "noise_scale" not in read_metrics(quiet)[0]


def test_noise_scale_after_a_two_process_resume_is_bitwise_that_of_the_uninterrupted_run(
    two_process_runs,
):
    """DDP regroups gradients into buckets after its first step, so a resumed run's buckets
    differ from the uninterrupted run's; the logged norms must not depend on them."""
    columns = ["step", "noise_scale", "noise_scale_ema"]
    runs = {
        name: _resume_config(two_process_runs, name).out_dir
        for name in ("uninterrupted", "resumed")
    }
    rows = {name: [[r[c] for c in columns] for r in read_metrics(d)] for name, d in runs.items()}
    assert len(rows["resumed"]) == 4 and rows["resumed"][2][1] != ""  # step 8: after the resume
    assert rows["resumed"] == rows["uninterrupted"]
    results = {n: json.loads((Path(d) / "result.json").read_text()) for n, d in runs.items()}
    for key in ("noise_scale", "noise_scale_grad_sqnorm", "noise_scale_trace_covariance"):
        assert results["resumed"]["extra"][key] == results["uninterrupted"]["extra"][key], key
    params = [final_checkpoint(d)["model"] for d in runs.values()]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


def test_cli_nproc_runs_two_worker_processes(tmp_path, capfd):
    """``largebatch run --nproc 2`` runs two worker processes, same result as one."""
    out = tmp_path / "cli"
    args = [
        "--task", TINY_TASK, "--optimizer", "sgd", "--opt", "momentum=0.9", "--lr", "0.05",
        "--batch-size", "32", "--accumulation-steps", "2", "--steps", "6", "--warmup", "2",
        "--eval-every", "3", "--no-progress", "--nproc", "2", "--out", str(out),
    ]  # fmt: skip
    pythonpath = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    launched = CliRunner().invoke(run, args, env={"PYTHONPATH": pythonpath})
    assert launched.exit_code == 0, (launched.output, capfd.readouterr().err)
    # the launcher alone reports (the workers print nothing)
    assert (launched.output + capfd.readouterr().out).count("done: 6 steps") == 1
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["extra"]["world_size"] == 2
    single = train(_config(tmp_path, "sgd", nproc=1))
    assert result["steps"] == single.steps == 6
    assert_same_params(
        final_checkpoint(str(out))["model"],
        final_checkpoint(_config(tmp_path, "sgd", 1).out_dir)["model"],
        atol=1e-5,
    )
