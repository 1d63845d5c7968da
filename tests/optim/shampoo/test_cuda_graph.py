"""Replayed steps: what a captured graph reads must be all a step needs.

A CUDA graph replays the kernels of its capture with the tensors of its capture. Without a
GPU the capture is replaced by a recording: "replaying" it calls the captured step body
again with the scalars tensor it was captured with. That is what a graph would do, as
long as the body reads every per-step value from that tensor or from the partition's
buffers, which is the property tested; a recording that froze the first step's Python
scalars (as a graph of a careless body would) gives a different trajectory.
"""

from __future__ import annotations

import pytest
import torch

from largebatch.optim.shampoo import Shampoo
from largebatch.optim.shampoo.cuda_graph import Captured, StepGraphs
from largebatch.optim.shampoo.scalars import StepScalars


def record(frozen: bool):
    """A stand-in for ``StepGraphs._capture`` on the CPU; also returns the captures and replays."""
    captures, replays = [], []

    def capture(self, fingerprint, body, scalars, partition):
        values = torch.tensor(scalars.values(), dtype=partition.dtype, device=partition.device)
        # frozen: the body as a graph of Python scalars would replay it
        read = scalars if frozen else StepScalars.views_of(values)
        captures.append(fingerprint)

        def launch():
            replays.append(fingerprint)
            body(read)

        return Captured(fingerprint, values, launch)

    return capture, captures, replays


def train(graphs: bool, device: str = "cpu", steps: int = 16) -> tuple[list[torch.Tensor], Shampoo]:
    """A small float64 model under a learning-rate schedule; one parameter left out at steps 10-11."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(device, torch.float64)
    optimizer = Shampoo(
        model.parameters(),
        lr=0.02,
        max_preconditioner_dim=4,
        precondition_frequency=4,
        staleness=1,
        start_preconditioning_step=3,
        weight_decay=0.01,
        nesterov=True,
        cuda_graphs=graphs,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        inputs = torch.randn(16, 6, generator=generator, dtype=torch.float64).to(device)
        targets = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(device)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        if step in (9, 10):
            model[2].bias.grad = None
        optimizer.step()
        schedule.step()
    return [p.detach().cpu() for p in model.parameters()], optimizer


def replayed_and_eager(monkeypatch, frozen: bool):
    """Training with recorded "graphs" on the CPU, and without."""
    capture, captures, replays = record(frozen)
    monkeypatch.setattr(StepGraphs, "eligible", lambda self, device, dtype: self.enabled)
    monkeypatch.setattr(StepGraphs, "_capture", capture)
    replayed, optimizer = train(graphs=True)
    eager, _ = train(graphs=False)
    return replayed, eager, captures, replays, optimizer


def test_replayed_steps_follow_the_eager_trajectory(monkeypatch):
    replayed, eager, captures, replays, optimizer = replayed_and_eager(monkeypatch, frozen=False)
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # Warm-up steps (1-2, grafted) and preconditioned ones each got a graph: warmed up at
    # steps 1 and 3, captured and replayed at steps 2 and 6, replayed at step 7. Root
    # refreshes (steps 4, 8, ...) and installs (5, 9, ...) ran eagerly. Leaving out a
    # parameter (steps 10-11) is a new graph (warmed up at 10, replayed at 11); after it,
    # that parameter lags two steps behind the others, its bias corrections differ, and
    # every step runs eagerly.
    assert [(fingerprint[1], len(fingerprint[2])) for fingerprint in captures] == [
        (False, 4),
        (True, 4),
        (True, 3),
    ]
    assert len(replays) == 4
    assert optimizer.root_staleness is not None


def test_a_graph_that_froze_the_first_scalars_would_be_caught(monkeypatch):
    replayed, eager, *_ = replayed_and_eager(monkeypatch, frozen=True)
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(replayed, eager))


def test_graphs_stay_off_the_cpu_and_when_disabled():
    graphs = StepGraphs(enabled=True)
    assert not graphs.eligible(torch.device("cpu"), torch.float32)
    assert not StepGraphs(enabled=False).eligible(torch.device("cuda"), torch.float32)
    assert not graphs.eligible(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="cuda_graphs: 1"):
        Shampoo([torch.nn.Parameter(torch.zeros(2, 2))], cuda_graphs=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_eager_trajectory_on_the_gpu():
    replayed, optimizer = train(graphs=True, device="cuda")
    eager, _ = train(graphs=False, device="cuda")
    assert optimizer._graphs._captured  # a graph was captured and replayed
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
