# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck services clean audit

$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

## The main job on the embedded default: SQLite and the filesystem broker under ./var/.
demo: $(STAMP)
	$(BIN)/crm-events demo

## Lint and type checks, then the whole test suite on real PostgreSQL, Redis and worker processes.
test: $(STAMP) services
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config models tasks workers tests bench
	$(BIN)/python -m pytest

services:
	tests/ensure_services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy config models tasks workers tests bench

## Known vulnerabilities in the pinned run-time dependencies (PyPI's advisory data; docs/security.md).
## AUDIT_FLAGS=--strict also fails when a dependency could not be looked up.
AUDIT_FLAGS ?=
audit: $(STAMP)
	$(BIN)/pip-audit -r requirements.lock --require-hashes --vulnerability-service pypi \
		--progress-spinner off --desc on $(AUDIT_FLAGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
