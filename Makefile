# `make run`: a 3-node demo mesh on loopback.  `make test`: ruff + mypy + the whole test suite.
# Both set up .venv themselves (re-installed only when pyproject.toml changes).
# `python -m pytest` puts the repo root on sys.path (tests import helpers from tests/*.py).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration venv clean bench report sim fuzz chaos dist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
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

# The lab chaos test (tests/lab/test_lab_chaos.py, root) RUNS times in a row, a new seed each
# time; stops at the first failure and prints its seed (MESHD_CHAOS_SEED replays it). `make test`
# runs it once, with the other lab tests.
RUNS ?= 20

chaos: $(STAMP)
	$(BIN)/python scripts/chaos_runs.py --runs $(RUNS)

# Coverage-guided fuzzing (atheris) of the wire decoder, the peer HTTP routes and the manifest
# parser, FUZZ_SECONDS each, one at a time; new inputs that add coverage are merged (-merge=1) into
# tests/fuzz/corpus/<target>/, which `make test` replays (tests/unit/test_fuzz_corpus.py). Seeds
# come from the current code (scripts/fuzz_seeds.py). A crash lands in tests/fuzz/crashes/<target>/
# and fails the target.
FUZZ_SECONDS ?= 60
FUZZ_MAX_LEN ?= 8192
FUZZ_TARGETS ?= wire http manifest

fuzz: $(STAMP)
	$(BIN)/python scripts/fuzz_seeds.py
	@status=0; for t in $(FUZZ_TARGETS); do \
	    new=$$(mktemp -d) && mkdir -p tests/fuzz/crashes/$$t && \
	    echo "fuzz $$t for $(FUZZ_SECONDS) s" && \
	    { $(BIN)/python tests/fuzz/fuzz_$$t.py -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) \
	        -timeout=10 -print_final_stats=1 -artifact_prefix=tests/fuzz/crashes/$$t/ \
	        $$new tests/fuzz/corpus/$$t || { status=1; echo "fuzz $$t: FINDING, see tests/fuzz/crashes/$$t/"; }; } && \
	    $(BIN)/python tests/fuzz/fuzz_$$t.py -merge=1 -max_len=$(FUZZ_MAX_LEN) tests/fuzz/corpus/$$t $$new \
	        2>&1 | tail -1; \
	    rm -rf $$new; \
	done; \
	$(BIN)/python scripts/fuzz_seeds.py --scrub; \
	exit $$status

# Side-by-side benchmarks (root; Debian serf, aria2, opentracker, mktorrent, casync, containerd,
# skopeo, docker-registry, curl: installed when missing), then the one report: every bench writes
# bench/results/<name>.md and its raw runs <name>.json; bench/report.py turns them (and the
# simulator's simulator*.json) into bench/results/README.md with PNG plots. matplotlib is the
# `bench` extra (the venv has it: tests check the plots too). BENCH_RUNS repetitions per figure
# (median and min-max); with 5, about 75 minutes on a quiet 2-core machine (distribution, 56 of
# them: 1x8, 1x16, 2x8 and 1x32 hosts x 3 systems), plus about 30 for the registry's (8 hosts
# pull a 200 MB image 4 ways).
BENCH_RUNS   ?= 5
DIST_CONFIGS ?= --config 1x8 --config 1x16 --config 2x8 --config 1x32

BENCH_TOOLS := serf aria2c opentracker mktorrent casync containerd ctr skopeo docker-registry curl

bench: $(STAMP)
	@missing=""; for t in $(BENCH_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing the side-by-side tools (missing:$$missing)"; \
	    apt-get update -qq && apt-get install -y -qq serf aria2 opentracker mktorrent casync \
	        containerd skopeo docker-registry curl; fi
	$(BIN)/python bench/membership.py
	$(BIN)/python bench/bench_queries.py --runs $(BENCH_RUNS)
	$(BIN)/python bench/bench_discovery.py --runs $(BENCH_RUNS)
	$(BIN)/python bench/bench_distribution.py --runs $(BENCH_RUNS) $(DIST_CONFIGS)
	$(BIN)/python bench/bench_registry.py --runs $(BENCH_RUNS)
	$(BIN)/python bench/bench_chunk_pipeline.py
	$(BIN)/python bench/bench_attacks.py
	$(BIN)/python bench/report.py

# Only the report, from the result files already there (no lab, no root).
report: $(STAMP)
	$(BIN)/python bench/report.py

# The many-node simulator against Serf's epidemic model (virtual time): 100 and 1,000 nodes at
# 0/5/10% loss, with and without churn, then 10,000 nodes in 1,000 sites (about 1.5 hours in
# all, 12 GB peak). Writes bench/results/simulator.json and .md; SIM_ARGS=--small for the small grid.
sim: $(STAMP)
	$(BIN)/python bench/sim_grid.py $(SIM_ARGS)
	$(BIN)/python bench/report.py

# The wheel and the sdist for a gateway install (README, "Run on a gateway"), into dist/.
# `build` (the dev extra) builds both in isolated environments: setuptools comes from the registry.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	@ls -l dist

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache dist
