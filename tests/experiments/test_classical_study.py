"""The classical study (`largebatch study classical`): one shipped sweep file per arm, the
figures and tables drawn from the runs' metrics, the review's expectations checked on them,
and an ``F*`` that agrees with the library's own full-batch L-BFGS."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.studies import get_study, run_study
from largebatch.experiments.studies.base import preset_path, results
from largebatch.experiments.studies.classical import (
    ARMS,
    DECREASE_MARGIN,
    FLOOR,
    PASSES,
    QUICK_FRACTION,
    Curve,
    Measured,
    expectations,
    study_curves,
    training_minimum,
)
from largebatch.tasks import get_task
from largebatch.train import RunConfig, train

STUDY = get_study("classical")


def test_every_arm_is_a_shipped_sweep_file_on_one_problem():
    """One part per arm, each a plain sweep file; --quick takes a tenth of its passes at the
    middle learning rate of its grid."""
    assert [part.name for part in STUDY.parts] == list(ARMS)
    problems = set()
    for part in STUDY.parts:
        assert part.file == f"classical-{part.name}.toml"
        data = tomllib.loads(preset_path(part.file).read_text())
        spec, quick = part.spec(), part.spec(quick=True)
        problems.add((spec.task, tuple(spec.task_options.items())))
        assert spec.schedule == "constant" and spec.warmup_steps == 0 and spec.scaling == "none"
        assert quick.epochs == pytest.approx(data["epochs"] * QUICK_FRACTION)
        assert quick.lrs == (data["lrs"][len(data["lrs"]) // 2],)
        expected = dict(spec.optimizer_settings)
        if "sqn" in expected:  # a Hessian sample that fits the quick training set
            expected["sqn"] = {**expected["sqn"], "hessian_batch_size": 128}
        assert quick.optimizer_settings == expected
    assert problems == {("logreg", (("num_features", 100),))}


def _curve(passes, gaps, minimum=0.1, steps=100, seconds_per_pass=2.0):
    passes = np.asarray(passes, dtype=float)
    return Curve(
        "x", "id", 0.1, steps, passes, passes * seconds_per_pass, minimum + np.asarray(gaps)
    )


def test_gaps_are_read_log_linearly_between_evaluations():
    curve = _curve([0, 10, 20], [1e-1, 1e-3, 1e-5])
    assert curve.gap_at(5, 0.1) == pytest.approx(1e-2)  # halfway on a log scale
    assert curve.gap_at(20.9, 0.1) == pytest.approx(1e-5)  # within 5%: the last value
    assert curve.gap_at(21.5, 0.1) is None  # beyond the run
    assert curve.reaches(1e-2, 0.1) == pytest.approx(5.0)
    assert curve.reaches(1e-2, 0.1, "seconds") == pytest.approx(10.0)
    assert curve.reaches(1e-6, 0.1) is None
    assert _curve([0, 1], [-1.0, 0.0]).gap(0.1)[0] == FLOOR  # below F*: the floor


def test_the_decrease_is_fitted_over_the_second_half_not_read_at_its_ends():
    x = np.arange(10.0, 21.0)
    linear = _curve(x, 10 ** (-0.2 * x))  # a factor 100 every 10 passes
    noisy = _curve(x, [1.2e-2] + [3e-3, 4.5e-3] * 5)  # on a floor after a peak
    measured = Measured({"svrg": linear, "sg": noisy}, 0.1, PASSES)
    assert measured.decrease("svrg") == pytest.approx(100.0)
    assert measured.gap("sg", 10) / measured.gap("sg", 20) == pytest.approx(8 / 3)
    assert measured.decrease("sg") < 1.6
    assert measured.decrease("saga") is None


def _review_world(lbfgs_late: float = 1e-3) -> dict[str, Curve]:
    """Curves that behave as the review says (SG fast then flat, variance reduction linear,
    L-BFGS slow then fast), with L-BFGS's final gap ``lbfgs_late``."""
    x = [0, 1, 5, 10, 20]
    flat = [0.5, 1e-2, 5e-3, 4e-3, 3.5e-3]
    linear = [0.5, 3e-2, 1e-2, 1e-3, 1e-5]
    return {
        "sg": _curve(x, flat, steps=72_000),
        "minibatch-sg": _curve(
            x, [0.5, 1.1e-2, 6e-3, 5e-3, 4.5e-3], steps=1_125, seconds_per_pass=0.1
        ),
        "svrg": _curve(x, linear),
        "saga": _curve(x, linear),
        "norm-test": _curve(x, [0.5, 3e-2, 2e-2, 1.5e-2, 1e-2], steps=80),
        "olbfgs": _curve(x, [0.5, 2e-1, 1e-2, 4e-3, 2e-3]),
        "sqn": _curve(x, [0.5, 2e-1, 1e-2, 4e-3, 2e-3]),
        "lbfgs": _curve(x, [0.5, 4e-1, 1e-1, 1e-2, lbfgs_late]),
    }


def test_the_review_s_expectations_agree_on_curves_that_behave_as_it_says():
    table = expectations(Measured(_review_world(), 0.1, PASSES))
    assert [row[-1] for row in table.rows] == ["yes"] * len(table.rows)
    # negative controls: L-BFGS never catching up, the arms exchanged, an arm missing
    table = expectations(Measured(_review_world(lbfgs_late=1e-2), 0.1, PASSES))
    assert table.rows[1][-1] == "no"
    world = _review_world()
    world["saga"], world["sg"] = world["sg"], world["saga"]
    assert expectations(Measured(world, 0.1, PASSES)).rows[2][-1] == "partly"
    world = _review_world()
    world["olbfgs"] = world["sqn"] = world["norm-test"]
    assert expectations(Measured(world, 0.1, PASSES)).rows[6][-1] == "no"
    del world["lbfgs"]
    rows = expectations(Measured(world, 0.1, PASSES)).rows
    assert rows[0][-1] == rows[1][-1] == "-" and "L-BFGS -" in rows[0][2]


def test_saga_and_svrg_each_get_a_verdict_with_margins():
    """SVRG ending below SG's last point but inside its band, with a fitted decrease like the
    noisy mini-batch arm's, is "partly" (single points would say yes); one ending above both
    bands and no faster is "no"; the linear SAGA is "yes"."""
    x = [0, 1, 5, 10, 15, 20]
    world = _review_world()
    world["sg"] = _curve(x, [0.5, 1e-2, 5e-3, 4e-3, 2e-3, 3.9e-3], steps=72_000)
    world["minibatch-sg"] = _curve(
        x, [0.5, 1.1e-2, 6e-3, 1.5e-2, 3e-3, 5.4e-3], steps=1_125, seconds_per_pass=0.1
    )
    world["svrg"] = _curve(x, [0.5, 6e-1, 5e-2, 9e-3, 5e-3, 3.2e-3])
    measured = Measured(world, 0.1, PASSES)
    assert measured.gap("svrg", PASSES) < measured.gap("sg", PASSES)  # one point: below SG
    assert measured.band_bottom("sg") == pytest.approx(2e-3)
    assert measured.band_bottom("sg") < measured.gap("svrg", PASSES)
    assert measured.decrease("svrg") > measured.decrease("minibatch-sg")  # but not clearly
    assert measured.decrease("svrg") < DECREASE_MARGIN * measured.decrease("minibatch-sg")
    rows = expectations(measured).rows
    assert [rows[2][0].split()[0], rows[3][0].split()[0]] == ["SAGA", "SVRG"]
    assert [rows[2][-1], rows[3][-1]] == ["yes", "partly"]
    world["svrg"] = _curve(x, [0.5, 6e-1, 5e-2, 2e-2, 2e-2, 2e-2])
    assert expectations(Measured(world, 0.1, PASSES)).rows[3][-1] == "no"


@pytest.mark.slow
def test_the_quick_study_runs_every_arm_and_draws_from_their_metrics(tmp_path):
    directory = tmp_path / "study"
    run_study(STUDY, directory, quick=True, progress=False)
    context = results(STUDY, directory, quick=True)
    # the quick budget is too short for some arms to beat chance level; none may fail
    for part in context.parts.values():
        assert part.wanted and all(r["status"] in ("done", "chance") for r in part.wanted)
    curves = study_curves(context)  # chance-level runs still give their curve
    assert list(curves) == list(ARMS)
    for curve in curves.values():
        assert curve.passes[0] == 0 and all(curve.passes[1:] > curve.passes[:-1])
        assert len(curve.seconds) == len(curve.train_loss) == len(curve.passes)
    (svrg,) = context.parts["svrg"].wanted  # effective passes count the snapshot's full pass
    assert curves["svrg"].passes[-1] == pytest.approx(svrg["extra"]["effective_passes"])
    assert (
        curves["svrg"].passes[-1]
        > 1.2 * svrg["examples"] / context.parts["svrg"].factory.train_size
    )
    md = (directory / "report.md").read_text()
    assert all(label in md for label in ARMS.values())
    assert "## Training loss against passes and time" in md and "| expectation |" in md
    for name in ("classical_passes.png", "classical_time.png"):
        assert (directory / "figures" / name).stat().st_size > 10_000

    def recorded():
        return {p: ResultsStore(directory / p).rows() for p in ARMS}

    before = recorded()
    run_study(STUDY, directory, quick=True, progress=False)  # all recorded: nothing runs
    assert recorded() == before


@pytest.mark.slow
def test_the_minimum_agrees_with_full_batch_lbfgs_in_the_loop(tmp_path):
    """SciPy's L-BFGS-B (float64, hand-written loss) and the registry's ``lbfgs`` trained by
    ``train`` on the whole training set (float32) reach the same minimum."""
    spec = STUDY.parts[0].spec()
    minimum = training_minimum(get_task(spec.task, **spec.task_options))
    config = RunConfig(
        task=spec.task, task_options=spec.task_options, optimizer="lbfgs", batch_size=3600,
        steps=80, eval_every=80, warmup_steps=0, schedule="constant",
        out_dir=str(tmp_path / "lbfgs"),
    )  # fmt: skip
    result = train(config)
    assert minimum > 0.05  # not separable: a finite minimum
    assert result.final_train_loss == pytest.approx(minimum, rel=1e-5)
    early = train(config.__class__(**{**config.to_dict(), "steps": 5, "eval_every": 5,
                                       "out_dir": str(tmp_path / "early")}))  # fmt: skip
    assert early.final_train_loss > minimum * (1 + 1e-3)  # negative control
