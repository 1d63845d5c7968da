# The two commands of the README: `make demo` (the default large-batch study)
# and `make test` (lint + the test suite). Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# every optional extra pyproject.toml declares, so each optional integration is tested
EXTRAS := $(shell $(PYTHON) -c "import tomllib; print(','.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']))")

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/largebatch demo

test: $(STAMP)
	$(VENV)/bin/ruff check largebatch tests benchmarks
	$(VENV)/bin/ruff format --check largebatch tests benchmarks
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) runs .pytest_cache
