"""Study presets and the study machinery: every preset runs (``--quick``), resumes, reports.

The quick runs check the report's structure and the databases' contents, not the numbers
(those are the full studies', in docs/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from study_helpers import SWEEP_TOML, TINY_OPTIONS, tiny_study

from largebatch.cli import main
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.studies import StudyError, Tuned, get_study, list_studies, run_study
from largebatch.experiments.studies.base import (
    MARKER,
    Adaptive,
    CellFactory,
    preset_path,
    results,
)
from largebatch.experiments.studies.demo import verdict
from largebatch.experiments.studies.keskar import WARM_TASK, WarmStart
from largebatch.experiments.sweep import SWEEP_FILE
from largebatch.experiments.sweep_config import load_sweep
from largebatch.experiments.tuning import grid_ratio

HERE = Path(__file__).parent
STUDIES = [study.name for study in list_studies()]


def test_the_source_papers_studies_and_the_demo_are_registered():
    assert {"demo", "keskar", "alto", "extrap", "shampoo", "scaling"} <= set(STUDIES)


#: studies whose tuned grids have three values: the demo (the issue allows it a small grid)
#: and the decentralized study (each of its cells is four processes)
SMALL_GRIDS = ("demo", "decentralized")


@pytest.mark.parametrize("name", STUDIES)
def test_presets_are_shipped_sweep_files_with_the_protocols_grids(name):
    """Each part's file is package data and a valid sweep file; tuned grids are log-spaced,
    with at least five values (three for :data:`SMALL_GRIDS`)."""
    pyproject = tomllib.loads((HERE.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["largebatch.experiments.studies"]
    assert "presets/*.toml" in patterns
    for part in get_study(name).parts:
        assert preset_path(part.file).is_file()
        spec = part.spec()
        part.spec(quick=True)
        if not isinstance(part.protocol, Tuned):
            continue
        for optimizer in spec.optimizers:
            settings = spec.settings_for(optimizer)
            grid = settings["lrs"] or settings["lr_factors"]
            assert len(grid) >= (3 if name in SMALL_GRIDS else 5), (name, optimizer)
            ratios = [b / a for a, b in zip(grid, grid[1:])]
            assert ratios == pytest.approx([grid_ratio(grid)] * len(ratios))


def test_list_prints_every_study_with_its_run_time():
    result = CliRunner().invoke(main, ["study", "--list"])
    assert result.exit_code == 0, result.output
    for study in list_studies():
        assert study.name in result.output
    assert result.output.count("min on 2 idle CPU cores") == len(STUDIES)


def test_unknown_study_and_a_directory_of_another_study_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["study", "keskr", str(tmp_path / "x")])
    assert result.exit_code == 2 and "keskar" in result.output  # the closest name
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MARKER).write_text(json.dumps({"study": "demo", "quick": True}))
    with pytest.raises(StudyError, match="holds the --quick variant of study 'demo'"):
        run_study(get_study("alto"), tmp_path / "d", quick=True)
    with pytest.raises(StudyError, match="choose another directory"):
        run_study(get_study("demo"), tmp_path / "d")  # the full variant
    assert not (tmp_path / "d" / "mnist1d-cnn").exists()  # refused before anything was made


def _tiny_file(tmp_path: Path, delay: float = 0.0) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP_TOML.format(delay=delay))
    return path


def test_factory_cells_are_the_plain_sweeps_cells(tmp_path, monkeypatch):
    """A protocol's cell of a grid value has the id `largebatch sweep --file` gives it."""
    monkeypatch.syspath_prepend(str(HERE))
    part = tiny_study(str(_tiny_file(tmp_path))).parts[0]
    factory = CellFactory(part.spec(), tmp_path / "part")
    for cell in factory.grid:
        c = cell.config
        assert factory.cell(c.optimizer, c.batch_size, c.seed, c.lr).cell_id == cell.cell_id


def test_tuning_keeps_each_topology_a_series_of_its_own(tmp_path):
    """With a topologies axis, the groups, cells and tuning are per (optimizer, topology):
    rows that favour another rate on each graph give each graph its own choice."""
    spec = load_sweep(
        overrides={
            "task": "teacher-student", "task_options": TINY_OPTIONS, "nproc": 4,
            "optimizers": ["sgd", "dmsgd"], "topologies": ["ring", "exp"],
            "batch_sizes": [16], "seeds": [0, 1], "epochs": 1, "lr_factors": [0.5, 1.0, 2.0],
        }
    )  # fmt: skip
    factory = CellFactory(spec, tmp_path)
    groups = factory.groups()
    assert list(groups) == [("sgd", None, 16), ("dmsgd", "ring", 16), ("dmsgd", "exp", 16)]
    for cell in factory.grid:
        c = cell.config
        same = factory.cell(c.optimizer, c.batch_size, c.seed, c.lr, c.topology)
        assert same.cell_id == cell.cell_id and same.config.topology == c.topology
    low, middle, high = groups["dmsgd", "ring", 16]
    best = {None: middle, "ring": low, "exp": high}  # at an edge on both graphs
    rows = {}
    for (optimizer, topology, _), lrs in groups.items():
        for lr in lrs:
            cell = factory.cell(optimizer, 16, 0, lr, topology)
            rows[cell.cell_id] = {
                "cell_id": cell.cell_id, "status": "done", "config": cell.config.to_dict(),
                "final_val_accuracy": 1.0 if lr == best[topology] else 0.5,
            }  # fmt: skip
    states = Tuned(max_extensions=0).states(factory, rows)
    assert {key: state.chosen for key, state in states.items()} == {
        ("sgd", None, 16): middle, ("dmsgd", "ring", 16): low, ("dmsgd", "exp", 16): high
    }  # fmt: skip
    seeds = [c for c in Tuned(max_extensions=0).cells(factory, rows) if c.config.seed == 1]
    assert {(c.config.topology, c.config.lr) for c in seeds} == {
        (None, middle), ("ring", low), ("exp", high)
    }  # fmt: skip


def test_adaptive_cells_join_a_finished_study_without_rerunning_it(tmp_path, monkeypatch):
    """A study run without the adaptive cells, then with them: every recorded run keeps its
    id and result, and only AutoWU (every batch size) and AdaScale (above the base batch)
    run, once per seed."""
    monkeypatch.syspath_prepend(str(HERE))
    plain = tiny_study(str(_tiny_file(tmp_path)))
    run_study(plain, tmp_path / "s", quick=True, progress=False)
    before = _database(tmp_path / "s" / "part")
    (part,) = plain.parts
    protocol = replace(part.protocol, adaptive=Adaptive(optimizers=("sgd",)))
    run_study(replace(plain, parts=(replace(part, protocol=protocol),)), tmp_path / "s",
              quick=True, progress=False)  # fmt: skip
    after = _database(tmp_path / "s" / "part")
    assert {cell: after[cell] for cell in before} == before
    new = sorted(re.sub(r"-[0-9a-f]{10}$", "", cell) for cell in set(after) - set(before))
    autowu = [name for name in new if name.endswith("-autowu")]
    assert autowu == [f"sgd-b{b}-s{s}-autowu" for b in (16, 64) for s in (0, 1)]
    adascale = [name for name in new if name not in autowu]
    assert [re.sub(r"-lr[0-9.e-]+-", "-", name) for name in adascale] == [
        "sgd-b64-s0-adascale", "sgd-b64-s1-adascale"
    ]  # fmt: skip


def test_adaptive_methods_are_checked():
    with pytest.raises(ValueError, match=r"Invalid adaptive methods: \['autowu', 'lars'\]"):
        Adaptive(methods=("autowu", "lars"))


def _database(directory: Path) -> dict[str, tuple]:
    return {
        row["cell_id"]: (row["status"], row["final_val_accuracy"], row["steps"])
        for row in ResultsStore(directory, create=False).rows()
    }


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """SIGKILL a study mid-run; running it again completes it, with exactly the runs (and
    results) of an uninterrupted study, each run once."""
    monkeypatch.syspath_prepend(str(HERE))
    sweep_file = _tiny_file(tmp_path, delay=0.01)
    reference = tmp_path / "reference"
    run_study(tiny_study(str(sweep_file), 0.0), reference, progress=False)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, str(HERE / "study_helpers.py"), str(killed), str(sweep_file), "0.01"],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        db = killed / "part" / "results.sqlite"
        if db.exists() and len(ResultsStore(db).statuses()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = _database(killed / "part")
    assert 1 <= len(partial) < len(_database(reference / "part"))

    run_study(tiny_study(str(sweep_file), 0.01), killed, progress=False)
    # the delay is a task option, so ids differ between the two studies: compare by name
    name = re.compile(r"-[0-9a-f]{10}$")
    resumed = {name.sub("", k): v for k, v in _database(killed / "part").items()}
    expected = {name.sub("", k): v for k, v in _database(reference / "part").items()}
    assert resumed == expected
    assert "](part/report.html)" in (killed / "report.md").read_text()  # the part's full report
    assert (killed / "part" / "report.html").exists()


def _check_study(name: str, directory: Path) -> None:
    """What every quick study must leave behind, read back from its files."""
    study = get_study(name)
    context = results(study, directory, quick=True)
    marker = json.loads((directory / MARKER).read_text())
    assert (marker["study"], marker["quick"]) == (name, True) and marker["cpu_seconds"] > 0
    md = (directory / "report.md").read_text()
    html = (directory / "report.html").read_text()
    assert md.startswith(f"# Study {name}:") and "<h2>" in html
    for section in study.sections(context):
        assert f"## {section.title}" in md
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (directory / figure).stat().st_size > 1000
    for part in context.parts.values():
        assert (part.directory / SWEEP_FILE).exists()
        wanted = part.protocol.cells(part.factory, part.by_id)
        assert {c.cell_id for c in wanted} <= set(part.by_id), f"{part.part.name}: runs missing"
        assert all(row["status"] in ("done", "diverged", "chance", "failed") for row in part.rows)
        if part.part.report and part.rows:
            assert f"`{part.part.name}`" in md  # how to write its full report
        if isinstance(part.protocol, Tuned):
            spec = part.factory.spec
            for (optimizer, topology, batch), state in part.states.items():
                assert state.settled and len(state.grid) >= 3
                chosen = [
                    r for r in part.wanted
                    if (r["optimizer"], r["config"].get("topology"), r["batch_size"], r["lr"])
                    == (optimizer, topology, batch, state.chosen)
                ]  # fmt: skip
                seeds_from = part.protocol.seeds_from or 0
                expected = len(spec.seeds) if batch >= seeds_from else 1
                assert sorted(r["seed"] for r in chosen) == list(spec.seeds[:expected])
                if state.at_edge is None:
                    assert state.grid[0] < state.chosen < state.grid[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_quick_study_runs_and_reports(name, tmp_path):
    """Every preset end to end with --quick through the command line, then its files."""
    directory = tmp_path / name
    args = ["study", name, str(directory), "--quick", "--jobs", "1", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"report: {directory / 'report.html'}" in result.output
    _check_study(name, directory)
    if name == "keskar":
        _check_keskar(directory)
    if name in ("alto", "scaling"):
        _check_adaptive(name, directory)


def _check_adaptive(name: str, directory: Path) -> None:
    """AutoWU at every batch size and AdaScale above the base batch, once per seed, for the
    protocol's optimizers; AdaScale at the rate the tuned run at the base batch used; the
    report's section with the tuned and adaptive columns and the cost."""
    context = results(get_study(name), directory, quick=True)
    (part,) = context.parts.values()
    adaptive = part.protocol.adaptive
    spec = part.factory.spec
    optimizers = [o for o in spec.optimizers if o in adaptive.optimizers]
    batches = sorted({b for *_, b in part.states})
    base = batches[0]
    assert optimizers and part.adaptive
    found = {}
    for row in part.adaptive:
        method = "autowu" if row["config"]["schedule"] == "autowu" else "adascale"
        found[method, row["optimizer"], row["batch_size"], row["seed"]] = row
    expected = {("autowu", o, b, s) for o in optimizers for b in batches for s in spec.seeds}
    expected |= {("adascale", o, b, s) for o in optimizers for b in batches[1:] for s in spec.seeds}
    assert set(found) == expected
    for (method, optimizer, _, _), row in found.items():
        if method == "autowu":
            assert row["lr"] is None and row["config"]["scaling"] is None
            continue
        config = row["config"]
        assert (config["scaling"], config["base_batch_size"]) == ("adascale", base)
        assert config["accumulation_steps"] >= 2
        tuned = next(r for r in part.wanted if (r["optimizer"], r["batch_size"]) == (optimizer, base)
                     and r["lr"] == part.states[optimizer, None, base].chosen)  # fmt: skip
        assert row["lr"] == pytest.approx(tuned["extra"]["lr"])  # the rate it ran at
    assert not {r["cell_id"] for r in part.wanted} & {r["cell_id"] for r in part.adaptive}
    md = (directory / "report.md").read_text()
    section = md[md.index("## Adaptive schedules (AutoWU, AdaScale)") :]
    header = "tuned: median steps to target" if name == "scaling" else "tuned: test accuracy (%)"
    for column in (header, "| AutoWU | AdaScale |", "AutoWU: peak lr", "tuned: runs (run-seconds)"):
        assert column in section, column
    assert "**Cost against the tuning**" in section
    assert (
        directory / "figures" / f"adaptive_{'steps' if name == 'scaling' else 'accuracy'}.png"
    ).exists()
    total = next(line for line in section.splitlines() if line.startswith("| all |"))
    runs = [int(cell.split()[0]) for cell in total.strip("| ").split(" | ")[2:]]
    tuned = sum(r["optimizer"] in optimizers for r in part.wanted)
    assert runs == [tuned, len(expected) - len(optimizers) * (len(batches) - 1) * len(spec.seeds),
                    len(optimizers) * (len(batches) - 1) * len(spec.seeds)]  # fmt: skip


def _check_keskar(directory: Path) -> None:
    """Sharpness of every finished run, the SB-LB interpolation, warm-started continuations."""
    for part in ("mnist1d-mlp", "mnist1d-cnn", "digits-cnn", "warm-start"):
        rows = ResultsStore(directory / part, create=False).rows()
        for row in rows:
            if row["status"] == "done":
                for column in ("sharpness", "sharpness_eps0.0005", "sharpness_subspace",
                               "sharpness_subspace_eps0.0005", "top_eigenvalue"):  # fmt: skip
                    assert row.get(column) is not None, (part, row["cell_id"], column)
        if part != "warm-start":
            assert json.loads((directory / part / "interpolation.json").read_text())
    study = get_study("keskar")
    warm = next(p for p in study.parts if p.name == "warm-start")
    protocol = warm.protocol_for(quick=True)
    assert isinstance(protocol, WarmStart)
    rows = ResultsStore(directory / "warm-start", create=False).rows()
    continued = [r for r in rows if r["task"] == WARM_TASK]
    assert len(continued) == len(protocol.starts) * len(warm.spec(quick=True).seeds)
    for row in continued:
        source = Path(row["config"]["task_options"]["run"])
        assert (source / "result.json").exists() and row["batch_size"] == protocol.large_batch


def _point(train: float, test: float, batch: int = 64):
    from largebatch.experiments.analysis import Point

    row = {"status": "done", "seed": 0, "final_train_accuracy": train, "final_test_accuracy": test}
    return Point("sgd", "sgd", batch, 0.1, (0.1,), "only one", [row])


def test_demo_verdict_splits_the_loss_of_accuracy_exactly():
    """deficit = under-training + generalization gap, and the larger names the cause."""
    ref = _point(train=1.00, test=0.97)
    under = verdict(_point(train=0.90, test=0.88, batch=4096), ref)
    assert under.deficit == pytest.approx(9.0)
    assert under.under_training + under.generalization == pytest.approx(under.deficit)
    assert under.cause == "under-training" and not under.keeps
    assert under.words.startswith("under-training: loses 9.0 points")
    gap = verdict(_point(train=0.995, test=0.93, batch=4096), ref)
    assert gap.cause == "generalization gap" and gap.generalization > gap.under_training
    assert verdict(_point(train=0.99, test=0.965), ref).keeps  # within one point
