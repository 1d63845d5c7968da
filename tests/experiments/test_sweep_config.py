"""Sweep definitions: TOML and flags, errors that name key and line, cells and their ids."""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from largebatch.experiments.sweep_config import (
    LATER_FIELDS,
    SweepConfigError,
    SweepSpec,
    cell_id,
    expand,
    load_sweep,
    toml_key_lines,
)
from largebatch.optim import get_spec
from largebatch.train.config import RESUMABLE_CHANGES, RunConfig

EXAMPLE = Path(__file__).parents[2] / "examples" / "sweep.toml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_file_parses(tmp_path):
    spec = load_sweep(EXAMPLE)
    assert spec.task == "mnist1d-cnn"
    assert "full" in spec.batch_sizes
    assert spec.hyperparameters["sgd"]["momentum"] == 0.9
    assert spec.optimizer_settings["sgd"]["scaling"] == "linear"


def test_file_values_and_sections(tmp_path):
    path = write(
        tmp_path,
        """
        task = "teacher-student"
        batch_sizes = [32, "full"]
        optimizers = ["sgd", "adamw"]
        seeds = [0, 1]
        steps = 50

        [task_options]
        num_train = 500

        [optimizer.adamw]
        lrs = [1e-3, 3e-3]
        warmup_steps = 5
        betas = [0.8, 0.99]
        """,
    )
    spec = load_sweep(path)
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.batch_sizes == (32, "full") and spec.seeds == (0, 1)
    assert spec.steps == 50 and spec.epochs is None
    assert spec.task_options == {"num_train": 500}
    assert spec.optimizer_settings == {"adamw": {"lrs": (1e-3, 3e-3), "warmup_steps": 5}}
    assert spec.hyperparameters == {"adamw": {"betas": (0.8, 0.99)}}
    assert spec.settings_for("adamw")["warmup_steps"] == 5
    assert spec.settings_for("sgd")["warmup_steps"] is None  # registry recommendation


def test_flags_override_file_and_budgets_exclude_each_other(tmp_path):
    path = write(tmp_path, 'optimizers = ["sgd"]\nsteps = 10\n')
    spec = load_sweep(path, overrides={"epochs": 2, "optimizers": ["adamw"]})
    assert spec.epochs == 2 and spec.steps is None and spec.optimizers == ("adamw",)


BAD_FILES = [
    # (file text, line of the bad key, key named in the error, words in the message)
    ('optimizers = ["sgd"]\nbogus = 1\n', 2, "bogus", "Unknown key"),
    ('optimizers = ["sgd", "adamx"]\n', 1, "optimizers", "Did you mean 'adamw'"),
    ('optimizers = ["sgd"]\n\ntask = "mnist1d-cn"\n', 3, "task", "Unknown task"),
    ('optimizers = ["sgd"]\nepochs = "3"\n', 2, "epochs", "expected a number"),
    ('optimizers = ["sgd"]\nbatch_sizes = [64,\n  "huge"]\n', 2, "batch_sizes", "item 1"),
    ('optimizers = ["sgd"]\nseeds = [0, 0]\n', 2, "seeds", "duplicate"),
    (
        'optimizers = ["sgd"]\n[optimizer.sgd]\nscaling = "cubic"\n',
        3,
        "optimizer.sgd.scaling",
        "expected one of",
    ),
    (
        'optimizers = ["sgd"]\n[optimizer.sgd]\nmomentum = "high"\n',
        3,
        "optimizer.sgd.momentum",
        "expected a number",
    ),
    (
        'optimizers = ["sgd"]\n[optimizer.sgd]\nmomentun = 0.9\n',
        3,
        "optimizer.sgd.momentun",
        "Did you mean 'momentum'",
    ),
    (
        'optimizers = ["sgd"]\n[optimizer.nope]\nlr = 0.1\n',
        2,
        "optimizer.nope",
        "Unknown optimizer",
    ),
    (
        'optimizers = ["sgd"]\n[task_options]\nnum_sample = 10\n',
        3,
        "task_options.num_sample",
        "Unknown option(s) 'num_sample'",
    ),
    (
        'optimizers = ["sgd"]\n[task_options]\nnum_samples = 2.5\n',
        3,
        "task_options.num_samples",
        "(expected int)",
    ),
    ('optimizers = ["sgd"]\nepochs = 3\nsteps = 4\n', 3, "steps", "not both"),
    ('optimizers = ["sgd"]\ntarget = ["accuracy"]\n', 2, "target", "[metric, value]"),
    ('optimizers = ["sgd"]\n"stop_at_target" = 1\n', 2, "stop_at_target", "true or false"),
    ('optimizers = ["sgd"]\nlr = 0.1\nlrs = [0.1, 0.2]\n', 3, "lrs", "set either lr or lrs"),
    (
        'optimizers = ["sgd"]\n[optimizer.sgd]\nlrs = [0.1]\nlr_factors = [1.0]\n',
        4,
        "optimizer.sgd.lr_factors",
        "not both",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "words"), BAD_FILES)
def test_bad_file_names_key_and_line(tmp_path, text, line, key, words):
    path = write(tmp_path, text)
    with pytest.raises(SweepConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {key}:"), message
    assert words in message


def test_toml_syntax_error_reports_line(tmp_path):
    path = write(tmp_path, 'optimizers = ["sgd"]\nepochs = = 3\n')
    with pytest.raises(SweepConfigError, match=r"invalid TOML.*line 2"):
        load_sweep(path)


def test_bad_flag_is_named():
    with pytest.raises(SweepConfigError, match=r"^--batch-sizes: batch_sizes: item 0"):
        load_sweep(overrides={"batch_sizes": ["x"]}, origins={("batch_sizes",): "--batch-sizes"})


def test_key_lines_scanner():
    text = textwrap.dedent(
        '''\
        # comment = not a key
        a = 1
        b = [1,
             2]
        notes = """
        c = inside a string
        """
        "quoted.key" = 2
        [x.y]
        z = {inner = 3}
        d.e = 4
        c = 5
        '''
    )
    lines = toml_key_lines(text)
    assert lines[("a",)] == 2 and lines[("b",)] == 3 and lines[("notes",)] == 5
    assert lines[("quoted.key",)] == 8
    assert lines[("x", "y")] == 9 and lines[("x", "y", "z")] == 10
    assert lines[("x", "y", "d", "e")] == 11
    assert lines[("x", "y", "c")] == 12
    assert ("c",) not in lines  # the line inside the multi-line string is not a key


def test_expansion_order_count_and_settings(tmp_path):
    spec = load_sweep(
        overrides={
            "task": "teacher-student",
            "batch_sizes": [16, "full"],
            "optimizers": ["sgd", "adamw"],
            "seeds": [0, 1],
            "lr_factors": [0.5, 2.0],
            "optimizer": {"adamw": {"lrs": [1e-3], "scaling": "none"}},
            "epochs": 2,
        }
    )
    cells = expand(spec, tmp_path, train_size=300, eval_every=lambda config: 7)
    # seeds x batch sizes x (sgd: 2 factors + adamw: 1 lr)
    assert len(cells) == 2 * 2 * 3
    keys = [(c.config.seed, c.config.batch_size, c.config.optimizer, c.config.lr) for c in cells]
    sgd_lr = get_spec("sgd").defaults["lr"]
    assert keys[:3] == [
        (0, 16, "sgd", 0.5 * sgd_lr),
        (0, 16, "sgd", 2.0 * sgd_lr),
        (0, 16, "adamw", 1e-3),
    ]
    assert {c.config.batch_size for c in cells} == {16, 300}  # "full" = training-set size
    adamw = next(c for c in cells if c.config.optimizer == "adamw")
    assert adamw.config.scaling == "none"
    sgd = next(c for c in cells if c.config.optimizer == "sgd")
    assert sgd.config.scaling is None and sgd.config.warmup_steps is None  # registry's choice
    assert all(c.config.eval_every == 7 and c.config.checkpoint_every == 7 for c in cells)
    assert all(Path(c.config.out_dir) == tmp_path / "runs" / c.cell_id for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)


def test_batch_growth_and_averaging_are_grid_axes(tmp_path):
    """``batch_growths`` x ``averagings`` cross the grid; their settings reach the cells that
    use them (and only those); a Hessian sample is set per optimizer."""
    path = write(
        tmp_path,
        """
        task = "teacher-student"
        batch_sizes = [16]
        optimizers = ["sgd", "newton-cg"]
        steps = 10
        schedule = "constant"
        batch_growths = ["none", "norm-test"]
        batch_growth_theta = 0.4
        max_batch_size = 64
        averagings = ["none", "ema"]
        averaging_decay = 0.9
        [batch_growth_options]
        every = 2
        [optimizer.newton-cg]
        hessian_batch_size = 8
        """,
    )
    cells = expand(load_sweep(path), tmp_path, train_size=300, eval_every=lambda config: 5)
    assert len(cells) == 2 * 2 * 2
    names = [c.cell_id.rsplit("-", 1)[0] for c in cells]
    assert names[:4] == [
        "sgd-b16-s0", "sgd-b16-s0-ema", "sgd-b16-s0-norm-test", "sgd-b16-s0-norm-test-ema",
    ]  # fmt: skip
    growing = [c.config for c in cells if c.config.batch_growth == "norm-test"]
    assert len(growing) == 4
    assert all(c.batch_growth_theta == 0.4 and c.max_batch_size == 64 for c in growing)
    assert all(c.batch_growth_options == {"every": 2} for c in growing)
    fixed = [c.config for c in cells if c.config.batch_growth is None]
    assert all(c.batch_growth_theta is None and c.max_batch_size is None for c in fixed)
    assert {c.config.averaging for c in cells} == {None, "ema"}
    assert all(c.config.averaging_decay == 0.9 for c in cells)
    hessian = {c.config.optimizer: c.config.hessian_batch_size for c in cells}
    assert hessian == {"sgd": None, "newton-cg": 8}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"batch_growths": ["norm_test"]}, "batch_growths: item 0: expected one of 'none'"),
        ({"averagings": ["swa"]}, "averagings: item 0: expected one of 'none', 'polyak', 'ema'"),
        ({"batch_growths": ["norm-test"], "batch_growth_theta": 0}, "batch_growth_theta"),
        ({"hessian_batch_size": 8}, "cell sgd-b16-s0: Invalid hessian_batch_size: 8"),
        ({"batch_growths": ["norm-test"]}, "cell sgd-b16-s0-norm-test: Invalid schedule"),
    ],
)
def test_bad_classical_sweep_keys_are_named(tmp_path, overrides, words):
    base = {"task": "teacher-student", "batch_sizes": [16], "optimizers": ["sgd"]}
    with pytest.raises(SweepConfigError, match=words):
        spec = load_sweep(overrides=base | overrides)
        expand(spec, tmp_path, train_size=300, eval_every=lambda config: 5)


def test_wrapper_base_sets_default_lr_and_accepted_keys(tmp_path):
    """``[optimizer.e] base = "lamb"``: lr_factors scale LAMB's default learning rate, not the
    default base's (AdamW), and LAMB-only hyperparameters are accepted."""
    lamb_lr, adamw_lr = get_spec("lamb").defaults["lr"], get_spec("adamw").defaults["lr"]
    assert lamb_lr != adamw_lr
    path = write(
        tmp_path,
        """
        task = "teacher-student"
        optimizers = ["e"]
        batch_sizes = [16]
        lr_factors = [0.5, 2.0]
        [optimizer.e]
        base = "lamb"
        bias_correction = false
        """,
    )
    spec = load_sweep(path)
    cells = expand(spec, tmp_path, train_size=300, eval_every=lambda config: 7)
    assert [c.config.lr for c in cells] == [0.5 * lamb_lr, 2.0 * lamb_lr]
    assert cells[0].config.optimizer_options == {"base": "lamb", "bias_correction": False}

    # negative controls: the default base (AdamW) has its own rate and no bias_correction
    default_base = load_sweep(
        overrides={"optimizers": ["e"], "batch_sizes": [16], "lr_factors": [1.0]}
    )
    (cell,) = expand(default_base, tmp_path, train_size=300, eval_every=lambda config: 7)
    assert cell.config.lr == adamw_lr
    with pytest.raises(SweepConfigError, match="bias_correction: Unknown key"):
        load_sweep(overrides={"optimizers": ["e"], "optimizer": {"e": {"bias_correction": False}}})
    with pytest.raises(SweepConfigError, match=r"optimizer\.sgd\.base: .*does not wrap"):
        load_sweep(overrides={"optimizers": ["sgd"], "optimizer": {"sgd": {"base": "lamb"}}})
    with pytest.raises(SweepConfigError, match=r"optimizer\.e\.base: Unknown optimizer 'lam'"):
        load_sweep(overrides={"optimizers": ["e"], "optimizer": {"e": {"base": "lam"}}})


def test_cell_ids_are_stable_hashes(tmp_path):
    spec = load_sweep(
        overrides={"task": "teacher-student", "optimizers": ["sgd"], "batch_sizes": [8]}
    )
    first = expand(spec, tmp_path / "a", 100, lambda config: 3)
    again = expand(
        SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))),
        tmp_path / "b",
        100,
        lambda c: 3,
    )
    assert [c.cell_id for c in first] == [c.cell_id for c in again]  # other directory, same ids

    config = first[0].config
    unhashed = {
        k: v
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_CHANGES and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }
    # added later (decentralized, schedules, classical methods): older cells keep their ids
    assert {"topology", "warmup_start", "batch_growth", "averaging"} <= LATER_FIELDS.keys()
    assert unhashed.keys().isdisjoint(LATER_FIELDS)
    digest = hashlib.sha256(json.dumps(unhashed, sort_keys=True).encode()).hexdigest()[:10]
    assert cell_id(config) == f"sgd-b8-s0-{digest}"
    assert cell_id(replace(config, checkpoint_every=999, out_dir="elsewhere")) == cell_id(config)
    assert cell_id(replace(config, optimizer_options={"momentum": 0.5})) != cell_id(config)
    assert cell_id(replace(config, averaging="ema")) != cell_id(config)  # off its default
    assert cell_id(replace(config, averaging_decay=0.9)) != cell_id(config)
    # the id this config had before any field of LATER_FIELDS existed (commit 23c7a24)
    assert cell_id(RunConfig(lr=0.1)) == "sgd-b64-s0-lr0.1-c5f9ee316d"


def test_task_options_have_one_check_which_converts(tmp_path):
    """The sweep and RunConfig check task options alike and keep the converted values."""
    sweep = {"task": "teacher-student", "optimizers": ["sgd"], "batch_sizes": [8]}
    spec = load_sweep(overrides={**sweep, "task_options": {"num_train": "100"}})
    typed = load_sweep(overrides={**sweep, "task_options": {"num_train": 100}})
    assert spec == typed and spec.task_options == {"num_train": 100}
    config = RunConfig(task="teacher-student", task_options={"num_train": "100"})
    assert config.to_dict()["task_options"] == {"num_train": 100}
    ids = [[c.cell_id for c in expand(s, tmp_path, 100, lambda c: 3)] for s in (spec, typed)]
    assert ids[0] == ids[1]
    with pytest.raises(SweepConfigError, match="task_options.num_train: Invalid value"):
        load_sweep(overrides={**sweep, "task_options": {"num_train": "lots"}})


def test_default_spec_round_trips():
    spec = SweepSpec()
    assert SweepSpec.from_dict(spec.to_dict()) == spec
