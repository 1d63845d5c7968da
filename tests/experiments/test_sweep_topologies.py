"""The topology as a sweep axis: it multiplies the decentralized optimizers' cells only."""

from __future__ import annotations

import pytest

from largebatch.experiments.sweep_config import SweepConfigError, expand, load_sweep


def test_topologies_multiply_only_the_decentralized_optimizers(tmp_path):
    spec = load_sweep(
        overrides={
            "task": "teacher-student", "optimizers": ["sgd", "dmsgd", "decentlam"],
            "topologies": ["ring", "one-peer-exp"], "batch_sizes": [8, 16], "nproc": 4,
        }
    )  # fmt: skip
    cells = expand(spec, tmp_path, 100, lambda config: 3)
    pairs = [(c.config.optimizer, c.config.topology) for c in cells if c.config.batch_size == 8]
    assert pairs == [
        ("sgd", None), ("dmsgd", "ring"), ("dmsgd", "one-peer-exp"),
        ("decentlam", "ring"), ("decentlam", "one-peer-exp"),
    ]  # fmt: skip
    names = [c.cell_id.rsplit("-", 1)[0] for c in cells[:3]]
    assert names == ["sgd-b8-s0", "dmsgd-ring-b8-s0", "dmsgd-one-peer-exp-b8-s0"]
    assert len({c.cell_id for c in cells}) == len(cells) == 10


def test_without_topologies_each_optimizer_takes_its_default(tmp_path):
    spec = load_sweep(
        overrides={
            "task": "teacher-student",
            "optimizers": ["decentlam"],
            "batch_sizes": [8],
            "nproc": 2,
        }
    )
    [cell] = expand(spec, tmp_path, 100, lambda config: 3)
    assert cell.config.topology is None and cell.cell_id.startswith("decentlam-b8-s0-")


def test_a_bad_topology_is_named_where_it_was_set(tmp_path):
    with pytest.raises(SweepConfigError, match=r"--topologies: topologies: item 1: .*got 'rings'"):
        load_sweep(
            overrides={"topologies": ["exp", "rings"]}, origins={("topologies",): "--topologies"}
        )
    spec = load_sweep(overrides={"optimizers": ["decentlam"], "topologies": ["one-peer-exp"],
                                 "nproc": 3, "batch_sizes": [9], "task": "teacher-student"})  # fmt: skip
    with pytest.raises(SweepConfigError, match=r"cell decentlam-one-peer-exp-b9-s0: .*: 3"):
        expand(spec, tmp_path, 100, lambda config: 3)
