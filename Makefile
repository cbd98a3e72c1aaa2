# Everything a user types. The venv lives in .venv; torch is pinned to 2.13.0 (CPU wheel).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXP     ?= default
ARGS    ?=
TORCH_INDEX ?=  # e.g. https://download.pytorch.org/whl/cu128 for a CUDA build of the same torch
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install fetch sweep ui server tables test test-fast lint bench clean

$(BIN)/harness: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DISABLE_CUDA=1 $(BIN)/pip install -q -e '.[dev,peers,ray,server]'  # hqq's sdist: skip its CUDA kernels
	touch $@

install: $(BIN)/harness
	$(BIN)/harness fetch --for-experiment $(EXP)

fetch: $(BIN)/harness
	$(BIN)/harness fetch $(ARGS)

sweep: install
	$(BIN)/harness sweep $(EXP) $(ARGS)

ui: $(BIN)/harness
	$(BIN)/harness ui $(EXP) $(ARGS)

# Debian's PostgreSQL 15 when missing (apt-get needs root), then the tracking server on 127.0.0.1.
server: $(BIN)/harness
	@test -x /usr/lib/postgresql/15/bin/initdb || { apt-get update -qq && apt-get install -y -qq postgresql-15; }
	$(BIN)/harness server $(ARGS)

tables: $(BIN)/harness
	$(BIN)/harness tables $(EXP) $(ARGS)

test: $(BIN)/harness
	$(BIN)/harness fetch --for-experiment smoke
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

# The unit tests alone: tiny random models, no assets, servers or other processes.
test-fast: $(BIN)/harness
	$(BIN)/python -m pytest -q -m "not integration" $(ARGS)

lint: $(BIN)/harness
	$(BIN)/ruff check harness tests benchmarks
	$(BIN)/ruff format --check harness tests benchmarks

bench: $(BIN)/harness
	$(BIN)/python benchmarks/quantize.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
