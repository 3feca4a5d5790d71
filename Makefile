# medcad — two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PORT   ?= 8000
HOST   ?= 127.0.0.1
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench proof clean install

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,train]'
	touch $(STAMP)

install: $(STAMP)

## Start the API and an embedded worker on SQLite with the shipped models.
run: $(STAMP)
	$(VENV)/bin/medcad serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check app workers models tests
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## Quality gates, then the full test suite (real Redis, PostgreSQL, worker, chromium).
test: $(STAMP)
	$(VENV)/bin/ruff check app workers models tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) tests/security/scan.py
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) tests/perf/run_bench.py $(if $(QUICK),--quick,)

proof: $(STAMP)
	$(PY) tests/proof/run_proof.py

clean:
	rm -rf medcad-data test-artifacts bench.json
