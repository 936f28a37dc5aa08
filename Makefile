# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo screens test lint typecheck services clean audit

$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

## The main job on the embedded default: SQLite and the filesystem broker under ./var/.
## In a terminal it then serves the screens until Ctrl-C.
demo: $(STAMP)
	$(BIN)/crm-events demo

## The screens on the demo's data, with a sign-in address for a token made now (Ctrl-C stops).
screens: $(STAMP)
	@token=$$($(BIN)/crm-events token create "screens-$$(date +%s)" --scope admin --staff anna \
		--json | $(BIN)/python -c 'import json, sys; print(json.load(sys.stdin)["token"])') && \
	echo "Open http://127.0.0.1:8080/login?token=$$token&next=/sellers/anna (Ctrl-C stops)" && \
	$(BIN)/crm-events serve --port 8080

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
