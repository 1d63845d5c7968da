"""Hook statistics against the ``vmap`` reference (float64, tight tolerance).

* Linear (flat and sequence inputs), LayerNorm, Embedding (with a padding row),
  Conv1d (each of its three rules: materialised, windows' Gram, input Gram),
  Conv2d and a layer called twice give the ``vmap`` statistics and mean, for
  single examples and groups, one chunk or several, the mean given or not.
* So does every built-in task's model that the hooks serve; the transformer's
  position embedding (no batch dimension) sends it to ``vmap``.
* A layer without a hook rule sends ``"auto"`` to ``vmap`` (``"hooks"`` refuses).
* Negative control: a wrong weight layout in the projection is caught.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from largebatch.diagnostics import per_example, per_example_hooks
from largebatch.diagnostics.per_example import gradient_statistics
from largebatch.diagnostics.per_example_hooks import UnsupportedModel, unsupported_reason
from largebatch.tasks import get_task, list_tasks


class Sequence(nn.Module):
    """Embedding, LayerNorm, a Linear on ``(batch, T, d)`` called twice, 1-D and 2-D convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.linear = nn.Linear(5, 6)
        self.narrow = nn.Conv1d(6, 4, 3, stride=2, padding=1)  # windows' Gram
        self.wide = nn.Conv1d(6, 16, 3, padding=2, dilation=2)  # input Gram
        self.thin = nn.Conv1d(6, 2, 1)  # materialised
        self.plane = nn.Conv2d(1, 3, (2, 3), padding=(1, 0), stride=(1, 2), dilation=(2, 1))
        self.out = nn.Linear(16 + 128 + 16 + 48, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.linear(self.norm(self.embedding(tokens)))  # (batch, 8, 6)
        h = self.linear(h[..., :5]) + h  # the same layer again
        channels = h.transpose(1, 2)
        features = [
            self.narrow(channels),
            self.wide(channels),
            self.thin(channels),
            self.plane(h[:, None]),
        ]
        return self.out(torch.tanh(torch.cat([f.flatten(1) for f in features], 1)))


def sequence_problem(n: int = 12):
    torch.manual_seed(0)
    return Sequence().double(), torch.randint(0, 7, (n, 8)), torch.randint(0, 3, (n,))


def dense_problem(n: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def assert_hooks_equal_vmap(model, loss_fn, x, y, **options) -> None:
    hooks, hook_mean = gradient_statistics(model, loss_fn, x, y, method="hooks", **options)
    vmap, vmap_mean = gradient_statistics(model, loss_fn, x, y, method="vmap", **options)
    for name in ("num_samples", "mean_sqnorm", "sum_sqnorms", "sum_projections_sq", "mean_loss"):
        assert getattr(hooks, name) == pytest.approx(getattr(vmap, name), rel=1e-10, nan_ok=True)
    for h, v in zip(hook_mean, vmap_mean):
        torch.testing.assert_close(h, v, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("problem", [dense_problem, sequence_problem])
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("chunk_size", [2, 100])
@pytest.mark.parametrize("mean_given", [False, True])
def test_hooks_equal_vmap(problem, group_size, chunk_size, mean_given):
    model, x, y = problem()
    mean = None
    if mean_given:
        F.cross_entropy(model(x), y).backward()
        mean = [p.grad for p in model.parameters()]
    assert_hooks_equal_vmap(
        model,
        F.cross_entropy,
        x,
        y,
        group_size=group_size,
        chunk_size=chunk_size,
        mean_gradient=mean,
    )


def test_every_rule_of_the_sequence_model_is_exercised():
    model, x, _ = sequence_problem()
    recorder = per_example_hooks.HookRecorder(model, list(model.parameters()))
    with recorder:
        model(x).sum().backward()
    kinds = {type(sample).__name__ for _, sample in recorder.sample_gradients(len(x), 1, 1.0)}
    assert kinds == {"_Factors", "_Conv1dGram", "_Rows", "_EmbeddingRows"}
    assert len(recorder.calls[model.linear]) == 2


@pytest.mark.parametrize("name", [spec.name for spec in list_tasks()])
def test_built_in_task_models(name):
    task = get_task(name)
    torch.manual_seed(0)
    model = task.build_model().double()
    x, y = task.train[:16]
    x = x.double() if x.is_floating_point() else x
    assert unsupported_reason(model, list(model.parameters())) is None
    if name == "modadd-transformer":  # its position embedding sees arange(3), not the batch
        with pytest.raises(UnsupportedModel, match="first dimension is not the batch"):
            gradient_statistics(model, task.loss_fn, x, y, method="hooks")
        return
    assert_hooks_equal_vmap(model, task.loss_fn, x, y, chunk_size=8)


def test_a_layer_without_a_rule_falls_back_to_vmap(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    assert unsupported_reason(model, list(model.parameters())) == "GroupNorm has no hook rule"
    with pytest.raises(UnsupportedModel, match="GroupNorm"):
        gradient_statistics(model, F.cross_entropy, x, y, method="hooks")
    vmap_chunks = []
    original = per_example._VmapChunk
    monkeypatch.setattr(
        per_example, "_VmapChunk", lambda *args: vmap_chunks.append(1) or original(*args)
    )
    auto, _ = gradient_statistics(model, F.cross_entropy, x, y, chunk_size=5)
    assert len(vmap_chunks) == 3 + 3  # three chunks, again for the projections
    monkeypatch.undo()
    reference, _ = gradient_statistics(model, F.cross_entropy, x, y, method="vmap")
    assert auto.trace_covariance == pytest.approx(reference.trace_covariance, rel=1e-12)


def test_a_wrong_weight_layout_is_caught(monkeypatch):
    """Negative control: the 1-D convolution's projection with the unfolded layout of Conv2d."""
    model, x, y = sequence_problem()
    monkeypatch.setattr(
        per_example_hooks, "_weight_matrix", lambda module, weight: weight.reshape(len(weight), -1)
    )
    with pytest.raises(AssertionError):
        assert_hooks_equal_vmap(model, F.cross_entropy, x, y)
