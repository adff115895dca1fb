# Two commands on a fresh machine: `make run` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
export PORT
# Options of the benchmark suite, e.g. BENCH_ARGS="--database sqlite" (see bench/README.md).
BENCH_ARGS ?=

.PHONY: run test test-postgres bench lint install clean

# Bytecode caches: without them every process (each server worker, each CLI command, each server a
# test starts) first compiles its imports, about 4 s on a small machine. Some machines export
# PYTHONDONTWRITEBYTECODE; the dependencies are compiled at install and our own modules cached.
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Start the whole system on its embedded default (SQLite under ./data, demo alliance loaded).
run: install
	$(VENV)/bin/alliance migrate
	$(VENV)/bin/alliance demo load
	$(VENV)/bin/alliance serve --port $(PORT)

## Lint, then run the test suite (SQLite; set ALLIANCE_TEST_POSTGRES_URL to run it on PostgreSQL).
test: install
	$(VENV)/bin/ruff check shared services gateway tests bench scripts
	$(PY) -m pytest $(PYTEST_ARGS)

## The same suite on a local PostgreSQL server.
test-postgres: install
	ALLIANCE_TEST_POSTGRES_URL=$${ALLIANCE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432} $(PY) -m pytest $(PYTEST_ARGS)

## Benchmarks (never part of the tests); see bench/README.md.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check shared services gateway tests bench scripts

clean:
	rm -rf $(VENV) data
