"""The classical methods on a CUDA device (skipped without one).

* oLBFGS, SQN, SVRG and SAGA step without synchronising with the host
  (``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronisation):
  the pair memory's skip rule and the statistics stay on the device.
* Their float64 steps on CUDA equal the same steps on the CPU.
* ``train`` runs every classical method, a growing batch and an iterate average on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from largebatch.optim import create_optimizer
from largebatch.optim.registry import get_spec
from largebatch.train import RunConfig, train
from largebatch.train.data import BatchStream
from largebatch.train.step import StepDriver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SYNC_FREE = ["olbfgs", "sqn", "svrg", "saga"]


def _setup(name: str, device: str):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 20, generator=generator, dtype=torch.float64)
    targets = (inputs[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 2).double().to(device)
    data = {"num_examples": 256} if get_spec(name).data_arguments else {}
    extra = {"inner_steps": 4} if name == "svrg" else {"update_every": 2} if name == "sqn" else {}
    optimizer = create_optimizer(name, model, lr=0.05, **data, **extra)
    dataset = TensorDataset(inputs, targets)
    sampler = DistributedSampler(dataset, 1, 0, shuffle=True, seed=0, drop_last=True)
    stream = BatchStream(dataset, sampler, 32, 1, torch.device(device))
    return model, StepDriver(model, optimizer, F.cross_entropy, full_pass_batch_size=64), stream


@pytest.mark.parametrize("name", SYNC_FREE)
def test_steps_do_not_synchronise_with_the_host(name):
    """Whole driver steps (data, gradients, snapshots, Hessian products, the step) after a
    warm-up that allocates the state; SVRG's snapshot and SQN's pair steps included."""
    _, driver, stream = _setup(name, "cuda")
    for _ in range(3):
        driver.step(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            driver.step(stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["svrg", "saga", "newton-cg", "olbfgs", "sqn", "lbfgs"])
def test_cuda_steps_equal_cpu_steps(name):
    results = []
    for device in ("cpu", "cuda"):
        model, driver, stream = _setup(name, device)
        for _ in range(8):
            driver.step(stream)
        results.append(torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "fields",
    [{"optimizer": name} for name in ("svrg", "saga", "newton-cg", "olbfgs", "sqn", "lbfgs")]
    + [
        {"optimizer": "sgd", "batch_growth": "norm-test", "batch_growth_theta": 0.5},
        {"optimizer": "sgd", "averaging": "ema", "averaging_decay": 0.9},
    ],
)
def test_train_runs_on_cuda(tmp_path, fields):
    config = RunConfig(
        task="logreg", task_options={"num_features": 50, "num_train": 600}, batch_size=64,
        steps=12, eval_every=6, warmup_steps=0, schedule="constant", device="cuda",
        out_dir=str(tmp_path / "run"), **fields,
    )  # fmt: skip
    result = train(config)
    assert result.status == "done", result.error
