"""The report: files, sections, embedded figures, plug-in sections, and the printed summary."""

from __future__ import annotations

import base64
import re

import pytest

from largebatch.experiments import report as report_module
from largebatch.experiments.report import Section, Table, register_section, report, summary
from largebatch.experiments.results_store import ResultsStore

CORE_TITLES = [
    "Overview",
    "Test accuracy vs batch size",
    "Generalization gap",
    "Steps to target and the critical batch size",
    "Loss curves",
    "Results by optimizer and batch size",
    "Diverged, chance-level and failed runs",
]
FIGURES = ["accuracy", "generalization_gap", "steps_to_target", "loss_curves"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sections_copy(monkeypatch):
    """The section registry (plug-ins imported first), restored after the test."""
    report_module._import_section_plugins()
    monkeypatch.setattr(report_module, "_SECTIONS", list(report_module._SECTIONS))


@pytest.fixture
def extra_section(sections_copy):
    """A section registered the way a later package would, for this test only."""

    @register_section("example-plugin", order=45)
    def example(ctx):
        values = [row.get("example_metric") for row in ctx.rows]
        return Section("Example plug-in", "From the metrics table.",
                       tables=[Table(["runs with the metric"], [[str(sum(v is not None for v in values))]])])  # fmt: skip

    @register_section("empty", order=46)
    def empty(ctx):
        return None


def test_report_files_and_sections(synthetic_sweep, extra_section):
    """Without diagnostics, the report has the core sections and the plug-in's, nothing more."""
    store = ResultsStore(synthetic_sweep)
    store.record_metrics(store.rows()[0]["cell_id"], {"example_metric": 3.5})
    html_path, md_path = report(synthetic_sweep)
    html, md = html_path.read_text(), md_path.read_text()

    titles = re.findall(r"<h2>(.*?)</h2>", html)
    expected = CORE_TITLES[:4] + ["Example plug-in"] + CORE_TITLES[4:]
    assert titles == expected
    assert re.findall(r"^## (.*)$", md, re.MULTILINE) == expected

    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) == len(FIGURES)
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    assert "<img" in html and "src='figures/" not in html  # self-contained
    for name in FIGURES:
        assert f"](figures/{name}.png)" in md
        assert (synthetic_sweep / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)

    assert "<td>1</td>" in html  # the plug-in section's table: one run with sharpness
    assert "between 1,024 and 4,096" in html  # lamb's critical batch size (see test_analysis)
    assert "(of 2, by val accuracy)" in html  # lr chosen on validation
    assert "diverged" in html and "non-finite loss" in html


def test_results_table_has_one_row_per_optimizer_and_batch(synthetic_sweep):
    html = report(synthetic_sweep)[0].read_text()
    table = html.split("<h2>Results by optimizer and batch size</h2>")[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 2 * 4


def test_summary_lists_every_optimizer_and_batch(synthetic_sweep):
    text = summary(ResultsStore(synthetic_sweep).rows())
    lines = text.splitlines()
    assert lines[1].split()[:5] == ["optimizer", "64", "256", "1,024", "4,096"]
    assert [line.split()[0] for line in lines[2:]] == ["lamb", "sgd"]
    assert "between 1,024 and 4,096" in lines[2]


def test_report_of_an_empty_sweep_is_an_error(tmp_path):
    ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="No runs recorded"):
        report(tmp_path)


def test_sharpness_section_from_database_columns(synthetic_sweep):
    """The diagnostics plug-in draws the sharpness columns when some runs have them."""
    store = ResultsStore(synthetic_sweep)
    for row in store.rows():
        if row["optimizer"] == "sgd":
            store.record_metrics(row["cell_id"], {"sharpness": row["batch_size"] / 64})
    html = report(synthetic_sweep)[0].read_text()
    section = html.split("<h2>Sharpness and curvature vs batch size</h2>")[1].split("<h2>")[0]
    assert section.count("<tr>") == 1 + 2 * 4  # header, 2 optimizers x 4 batch sizes
    assert "<td>sgd</td><td>4,096</td><td>64</td>" in section  # mean over the selected runs
    assert "<td>lamb</td><td>64</td><td>-</td>" in section  # no value: a dash
    assert "Interpolation from" not in html and "noise scale" not in html.lower()


def test_duplicate_section_names_are_refused(sections_copy):
    with pytest.raises(ValueError, match="already registered"):
        register_section("overview")(lambda ctx: None)


def test_batch_growth_and_averaging_sections_from_a_real_sweep(tmp_path):
    """A sweep over the ``batch_growths`` and ``averagings`` axes: the report shows each growing
    run's batch sizes and each averaged run's metrics, from the runs' own records."""
    from sweep_helpers import tiny_spec

    from largebatch.experiments.sweep import prepare, run_sweep

    spec = tiny_spec(
        batch_sizes=[16], optimizers=["sgd"], schedule="constant", batch_growths=["none", "norm-test"],
        batch_growth_theta=0.6, averagings=["none", "polyak"], averaging_start=4,
    )  # fmt: skip
    statuses = run_sweep(prepare(spec, tmp_path), progress=False)
    assert len(statuses) == 4 and set(statuses.values()) == {"done"}
    html_path, _ = report(tmp_path)
    html = html_path.read_text()
    growth = html.split("<h2>Batch growth</h2>")[1].split("<h2>")[0]
    assert growth.count("<tr>") == 1 + 2  # the two growing runs (with and without an average)
    assert "<td>norm-test</td><td>0.6</td><td>16</td>" in growth
    averaging = html.split("<h2>Iterate averaging</h2>")[1].split("<h2>")[0]
    assert averaging.count("<tr>") == 1 + 2 and "<td>polyak</td><td>4</td><td>-</td>" in averaging
    stored = ResultsStore(tmp_path).rows()
    averaged = [r for r in stored if r["config"]["averaging"]]
    loss = averaged[0]["extra"]["averaged"]["test"]["loss"]
    assert f"{loss:.3g}" in averaging
