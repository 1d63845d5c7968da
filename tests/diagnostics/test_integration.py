"""``largebatch diagnose`` end to end on tiny trained runs, checked against exact references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.func import functional_call
from torch.nn import functional as F

from largebatch.cli import main
from largebatch.diagnostics import evaluate, fixed_subset, interpolate_checkpoints
from largebatch.tasks import get_task
from largebatch.tasks.cache import CACHE_ENV
from largebatch.train import RunConfig, train
from largebatch.train.checkpoint import load_latest

TASK_OPTIONS = {
    "num_train": 400, "num_test": 100, "input_dim": 5, "num_classes": 3,
    "teacher_hidden": 4, "student_hidden": 6,
}  # fmt: skip
SUBSET = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same task (batch 16 and 128) and one of another task; their directories."""
    root = tmp_path_factory.mktemp("diagnose")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root / "cache"))
        made = {}
        for name, batch_size, options in [
            ("small", 16, TASK_OPTIONS),
            ("large", 128, TASK_OPTIONS),
            ("other", 16, {**TASK_OPTIONS, "num_train": 300}),
        ]:
            config = RunConfig(
                task="teacher-student", task_options=options, optimizer="sgd", lr=0.3,
                batch_size=batch_size, steps=12, warmup_steps=0, out_dir=str(root / name),
            )  # fmt: skip
            assert train(config).status == "done"
            made[name] = root / name
        yield made


def invoke(*args):
    return CliRunner().invoke(main, ["diagnose", *map(str, args)])


def _weights(run_dir):
    return load_latest(run_dir / "checkpoints")[0]["model"]


def _exact(run_dir, data):
    """Float64 loss and dense Hessian of the mean loss on ``data`` (one batch), by autograd."""
    task = get_task("teacher-student", **TASK_OPTIONS)
    model = task.build_model().double()
    state = {k: v.double() for k, v in _weights(run_dir).items()}
    names = [name for name, _ in model.named_parameters()]
    shapes = [state[name].shape for name in names]
    flat = torch.cat([state[name].reshape(-1) for name in names])
    inputs, targets = data

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}
        return F.cross_entropy(functional_call(model, params, (inputs.double(),)), targets)

    return loss(flat).item(), torch.autograd.functional.hessian(loss, flat).numpy()


def test_diagnose_and_compare_end_to_end(runs, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(runs["small"].parent / "cache"))
    other_checkpoint = load_latest(runs["large"] / "checkpoints")[1]
    result = invoke(
        runs["small"], "--examples", SUBSET, "--k", 2, "--probes", 30, "--subspace-dim", 5,
        "--epsilons", "1e-3", "--diagnostics", "sharpness,eigenvalues,trace,density",
        "--density-steps", 5, "--compare", other_checkpoint,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in ("sharpness, full space, eps=0.001", "sharpness, p=5, eps=0.001",
                 "top 2 Hessian eigenvalue(s)", "Hessian trace", "spectral density",
                 "interpolation A->B, train loss", "interpolation A->B, test loss"):  # fmt: skip
        assert line in result.output
    record = json.loads((runs["small"] / "diagnostics.json").read_text())
    assert record["step"] == 12 and record["num_examples"] == SUBSET

    # the numbers are those of the checkpoint's weights on the seeded training subset
    task = get_task("teacher-student", **TASK_OPTIONS)
    (batch,) = fixed_subset(task.train, SUBSET, seed=0)
    loss, hessian = _exact(runs["small"], batch)
    eigenvalues = np.linalg.eigvalsh(hessian)[::-1]
    assert record["subset"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert record["eigenvalues"]["eigenvalues"] == pytest.approx(eigenvalues[:2], rel=2e-3)
    trace = record["trace"]
    assert trace["ci_low"] <= np.trace(hessian) <= trace["ci_high"]
    assert [s["subspace_dim"] for s in record["sharpness"]] == [None, 5]
    assert all(s["sharpness"] >= 0 and s["loss"] == pytest.approx(loss, rel=1e-6)
               for s in record["sharpness"])  # fmt: skip
    assert np.sum(record["density"]["weights"]) == pytest.approx(1.0)

    # interpolation: alpha 0 and 1 are the two runs' own losses on the same subsets
    curves = record["interpolation"]["curves"]
    alphas = record["interpolation"]["alphas"]
    assert alphas[0] == -1.0 and alphas[-1] == 2.0
    large_loss, _ = _exact(runs["large"], batch)
    assert curves["train"]["loss"][alphas.index(0.0)] == pytest.approx(loss, rel=1e-5)
    assert curves["train"]["loss"][alphas.index(1.0)] == pytest.approx(large_loss, rel=1e-5)
    assert set(curves["test"]) == {"loss", "accuracy"}
    assert (runs["small"] / "interpolation.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere"], "does not exist"),
        (["{tmp}"], "No config.json in"),
        (["{small}", "--examples", "0"], "Invalid num_examples: 0"),
        (["{small}", "--diagnostics", "sharpness,hessian"], "Invalid diagnostics: 'hessian'"),
        (["{small}", "--diagnostics", "none"], "Nothing to do"),
        (["{small}", "--epsilons", "tiny"], "expected numbers separated by commas"),
        (["{small}", "--epsilons", "-1e-3"], "Invalid epsilon: -0.001"),
        (["{small}", "--k", "0"], "Invalid k: 0"),
        (["{small}", "--device", "tpu"], "Invalid device: 'tpu'"),
        (["{small}", "--diagnostics", "none", "--compare", "{other}"],
         "Cannot interpolate between different tasks"),
    ],
)  # fmt: skip
def test_bad_paths_and_values_get_clear_errors(runs, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv(CACHE_ENV, str(runs["small"].parent / "cache"))
    paths = {"tmp": tmp_path, "small": runs["small"], "other": runs["other"]}
    result = invoke(*(arg.format(**paths) for arg in args))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_evaluate_takes_one_pass_iterables_and_interpolation_refuses_them():
    """The training loop streams evaluation batches once; diagnostics that pass over the data
    several times still reject a one-shot iterator with a clear error."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    inputs, targets = torch.randn(10, 3), torch.randint(0, 2, (10,))
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    streamed = evaluate(model, F.cross_entropy, iter(batches))
    assert streamed["loss"] == pytest.approx(F.cross_entropy(model(inputs), targets).item())
    state = model.state_dict()
    with pytest.raises(TypeError, match="must be re-iterable"):
        interpolate_checkpoints(model, state, state, F.cross_entropy, {"train": iter(batches)})
