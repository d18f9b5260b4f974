# `make run`: a 3-node demo mesh on loopback.  `make test`: ruff + mypy + the whole test suite.
# Both set up .venv themselves (re-installed only when pyproject.toml changes).
# `python -m pytest` puts the repo root on sys.path (tests import helpers from tests/*.py).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration venv clean bench sim

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/demo.py

test: lint typecheck unit
	$(BIN)/python -m pytest -q --ignore=tests/unit

# ruff skips folders named like build output without a word: the gate checks it linted every
# tracked .py file.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_lint_coverage.py

typecheck: $(STAMP)
	$(BIN)/mypy

# tests/unit uses no network, real time or subprocess: as root it runs where even loopback is down.
unit: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then \
	    echo "tests/unit in a network namespace with no interface up (unshare -n)"; \
	    unshare -n $(BIN)/python -m pytest -q tests/unit; \
	else \
	    echo "tests/unit with the network (unshare -n needs root)"; \
	    $(BIN)/python -m pytest -q tests/unit; \
	fi

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# Side-by-side benchmarks (root; Debian serf, aria2, opentracker, mktorrent, casync): results
# land in bench/results/*.md. About 12 minutes in all.
bench: $(STAMP)
	$(BIN)/python bench/membership.py
	$(BIN)/python bench/bench_queries.py
	$(BIN)/python bench/bench_discovery.py
	$(BIN)/python bench/bench_distribution.py
	$(BIN)/python bench/bench_chunk_pipeline.py
	$(BIN)/python bench/bench_attacks.py

# The many-node simulator against Serf's epidemic model (virtual time).
sim: $(STAMP)
	$(BIN)/python -m meshd.sim --nodes 100 --nodes 300 --out bench/results/simulator.md

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
