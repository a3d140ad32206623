# genq: `make run` starts the whole stack on this machine, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so that pip keeps it instead of pulling a CUDA build
# (set TORCH_SPEC to another release, e.g. a CUDA one, on a GPU machine).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist): one more than the CPUs this process may use,
# at most 8 (with one per CPU the CPUs sat idle a third of the time, as tests wait on leases,
# timers and processes starting: docs/tests.md); `auto` is one per CPU, 0 runs in this process.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; cpus = len(os.sched_getaffinity(0)) \
	if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1; print(min(cpus + 1, 8))')

.PHONY: run test lint fmt install bench docs clean

$(BIN)/genq: pyproject.toml examples/genq-family-ngram/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	# The example plug-in family, which the tests run through genq (README: Write a family).
	# --no-deps: it runs on genq's own packages.
	$(BIN)/python -m pip install --quiet --no-deps -e examples/genq-family-ngram
	touch $(BIN)/genq

install: $(BIN)/genq

run: $(BIN)/genq
	$(BIN)/genq up

test: $(BIN)/genq
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(BIN)/genq
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	# The import contracts of docs/architecture.md ([tool.importlinter] in pyproject.toml).
	$(BIN)/lint-imports --no-logo

fmt: $(BIN)/genq
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/genq
	$(BIN)/python bench/throughput.py

# The docs site into site/: guides from docs/, the front page from README.md, benchmarks from
# bench/README.md, settings and the HTTP API reference generated (docs/hooks/genq_docs.py).
# Strict: a broken link or anchor fails the build. The variable hushes a banner of the theme's.
docs: $(BIN)/genq
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) var site .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
