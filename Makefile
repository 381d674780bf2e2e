# The two commands a new user needs: `make demo` (run the main job) and `make test` (run the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BLASTSCAN_DATA ?= ../shared/datasets
export BLASTSCAN_DATA
# Test processes (pytest-xdist; an idle worker takes queued tests from a busy one, so the slow files overlap).
TEST_WORKERS ?= 2
# Threads per test process (PyTorch, BLAS, ONNX Runtime): 2 workers x 2 threads on 2 cores left small tests waiting
# on each other's thread pools; with one thread each the suite ran in about a third of the time in CI here.
TEST_THREADS ?= 1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[full,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blastscan demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/deptry src
	$(BIN)/lint-imports
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cache_throughput.py

clean:
	rm -rf runs .cache .pytest_cache .ruff_cache
