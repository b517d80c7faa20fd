# fedsim: `make run` (set up + default experiment), `make test` (set up + test suite).
# Both install the committed lock (requirements.lock) into .venv with uv; `make lock`
# refreshes the lock on purpose from pyproject.toml's ranges. uv compiles the bytecode at
# install, as pip does: without it, a machine with PYTHONDONTWRITEBYTECODE=1 compiles torch's
# sources in every process.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsim-installed
LOCK := requirements.lock
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
# uv does not read pip's config: hand it pip's find-links, where a machine keeps its
# CPU build of torch (empty elsewhere; see the README's install notes).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS := --python $(BIN)/python $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: run test bench lint lock

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --compile-bytecode $(UV_FLAGS) $(LOCK)
	$(BIN)/uv pip install --quiet --no-deps $(UV_FLAGS) -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedsim $(ARGS)

# one pytest worker per core, at most 4 (pytest-xdist): the deployment and Ray tests spend
# much of their time waiting on other processes; `loadfile` keeps a module's fixtures in
# one worker, and files are handed out in collection order, which tests/conftest.py starts
# with the longest files. One file runs as usual: `.venv/bin/python -m pytest tests/<file>`.
test: $(STAMP)
	$(BIN)/ruff check fedsim scripts tests
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

# Re-resolve every pin (newest releases within pyproject.toml's ranges), then review
# the diff and run `make test` before committing it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
		--custom-compile-command "make lock" --upgrade --quiet -o $(LOCK)
