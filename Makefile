# dbreset — make help lists the targets.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
BIN := $(VENV)/bin
# uv from the PATH when there is one, else a private copy bootstrapped from PyPI.
UV ?= $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
export UV_PYTHON_DOWNLOADS := never
export UV_COMPILE_BYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint db-reset bench bench-quick lock clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(BIN)/.synced: requirements-dev.lock pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip sync --quiet requirements-dev.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --no-deps -e .
	@touch $@

setup: $(BIN)/.synced ## Create .venv from the lock file (uv is bootstrapped if missing)

demo: setup ## Start a throwaway PostgreSQL, migrate, fill, then status → reset → status
	$(BIN)/python examples/demo.py

test: setup ## Run the test suite (a throwaway PostgreSQL unless DBRESET_TEST_URL is set)
	$(BIN)/pytest -n 2

lint: setup ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

db-reset: setup ## Reset DATABASE_URL before a test run: copy this target into your Makefile
	$(BIN)/dbreset reset --yes

bench: setup ## Time dbreset against the usual hand-written hook (writes bench/results.md)
	$(BIN)/python bench/run.py

bench-quick: setup ## The benchmark on a small scale, to check that it works
	$(BIN)/python bench/run.py --quick

lock: | $(UV) ## Recompile requirements-dev.lock: the dependencies, [embedded] and the dev group
	$(UV) pip compile pyproject.toml --extra embedded --group dev --python-version 3.11 \
		--generate-hashes --no-header --quiet -o requirements-dev.lock

clean: ## Remove the virtual environment and caches (stops nothing: servers stop themselves)
	rm -rf $(VENV) .tools .cache .pytest_cache .mypy_cache .ruff_cache
