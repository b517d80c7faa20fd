# fedsim: `make run` (set up + default experiment), `make test` (set up + test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsim-installed

.PHONY: run test bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedsim $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check fedsim scripts tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)
