"""The case study's machinery: every arm runs as an ordinary sweep, the figures and the table
come from the runs' metrics, and its ``F*`` agrees with the library's own full-batch L-BFGS."""

from __future__ import annotations

import pytest

from largebatch.experiments.classical_study import (
    ARMS,
    TASK,
    TASK_OPTIONS,
    run_study,
    study_curves,
    training_minimum,
    write_study,
)
from largebatch.experiments.results_store import ResultsStore
from largebatch.tasks import get_task
from largebatch.train import RunConfig, train


def test_the_quick_study_runs_every_arm_and_draws_from_their_metrics(tmp_path):
    statuses = run_study(tmp_path / "study", quick=True, progress=False)
    assert list(statuses) == list(ARMS)
    # the quick budget is too short for some arms to beat chance level; none may fail
    assert all(set(cells.values()) <= {"done", "chance"} for cells in statuses.values())
    curves = study_curves(tmp_path / "study", quick=True)
    assert list(curves) == list(ARMS)
    for curve in curves.values():
        assert curve.passes[0] == 0 and all(curve.passes[1:] > curve.passes[:-1])
        assert len(curve.seconds) == len(curve.train_loss) == len(curve.passes)
    svrg = curves["SVRG (b=16)"]  # effective passes count the snapshot's full pass
    rows = ResultsStore(tmp_path / "study" / "svrg-b-16").rows()
    assert svrg.passes[-1] == pytest.approx(rows[0]["extra"]["effective_passes"])
    table = write_study(tmp_path / "study", tmp_path / "figures", quick=True)
    assert all(label in table for label in ARMS)
    for name in ("classical_passes.png", "classical_time.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000
    again = run_study(tmp_path / "study", quick=True, progress=False)  # all recorded: nothing runs
    assert again == statuses


@pytest.mark.slow
def test_the_minimum_agrees_with_full_batch_lbfgs_in_the_loop(tmp_path):
    """SciPy's L-BFGS-B (float64, hand-written loss) and the registry's ``lbfgs`` trained by
    ``train`` on the whole training set (float32) reach the same minimum."""
    minimum = training_minimum(get_task(TASK, **TASK_OPTIONS))
    config = RunConfig(
        task=TASK, task_options=TASK_OPTIONS, optimizer="lbfgs", batch_size=3600, steps=80,
        eval_every=80, warmup_steps=0, schedule="constant", out_dir=str(tmp_path / "lbfgs"),
    )  # fmt: skip
    result = train(config)
    assert minimum > 0.05  # not separable: a finite minimum
    assert result.final_train_loss == pytest.approx(minimum, rel=1e-5)
    early = train(config.__class__(**{**config.to_dict(), "steps": 5, "eval_every": 5,
                                       "out_dir": str(tmp_path / "early")}))  # fmt: skip
    assert early.final_train_loss > minimum * (1 + 1e-3)  # negative control
