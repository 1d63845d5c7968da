"""The optimizer table in docs/optimizers.md is generated from the registry and must be current."""

from pathlib import Path

import pytest

from largebatch.optim.docs_table import BEGIN, END, registry_table, render_into
from largebatch.optim.registry import list_optimizers

DOCS = Path(__file__).resolve().parents[2] / "docs" / "optimizers.md"


def test_table_lists_every_registered_optimizer():
    table = registry_table()
    for spec in list_optimizers():
        assert f"| `{spec.name}` |" in table


def test_docs_table_is_current():
    text = DOCS.read_text()
    assert render_into(text) == text, (
        "docs/optimizers.md is stale: run `python -m largebatch.optim.docs_table docs/optimizers.md`"
    )


def test_missing_markers_is_an_error():
    with pytest.raises(ValueError, match="markers"):
        render_into("no markers here")
    assert BEGIN in render_into(f"x\n{BEGIN}\nold\n{END}\ny")
