# Set-up, build, test and demo on a fresh machine: `make test`, `make demo`.
# Everything is installed into $(VENV) by these rules; nothing by hand.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c  # a failing command before a | tee fails the rule
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
EXT_STAMP := $(VENV)/.rcl_ops-extension
DEPS_STAMP := $(VENV)/.rcl_ops-deps
INSTALL_STAMP := $(VENV)/.rcl_ops-install

.PHONY: all test lint format demo tables bench build gpu-check peer-wheels clean

all: test

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(DEPS_STAMP): requirements-test.txt | $(PY)
	$(PIP) install --quiet -r requirements-test.txt
	touch $@

# The editable install registers the package (and its console scripts); the extension is
# (re)built in place, incrementally, whenever a source under csrc/ changes.
$(INSTALL_STAMP): $(DEPS_STAMP) pyproject.toml setup.py
	RCL_OPS_BUILD_EXTENSION=0 $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

$(EXT_STAMP): $(INSTALL_STAMP) $(CSRC) setup.py
	rm -f rcl_ops/_C.cpython-*.so  # a per-version binary of an older build would shadow the abi3 one
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(EXT_STAMP)

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CSRC)

# All the tests, the slow ones too; `$(PY) -m pytest -m "not slow" tests` is the fast subset (no whole
# trainer runs or experiments, no torchrun or other subprocesses).
test: build lint
	$(PY) -m pytest -q tests

# Distances between residuals of real images, then the reference trainer's quick preset, a
# smoke-level demo (RCL-EMD with its two controls, N2N, Oracle; three seeds: the
# contrast check, pre-train, proxy-evaluate, table, diagnostics, plots) on the bundled images.
demo: build
	$(PY) -m rcl_ops.demo
	$(PY) -m rcl_ops.train --preset quick --output-dir runs

# The quick CPU setting of every paper table (rcl-train experiment table1 ... table5), one after the
# other, each writing runs/tableN-quick-<time>/paper_comparison.md; about half an hour on a 2-core CPU before
# the RCL controls were added to every table (Table 1 alone now: 9.9 min on a shared 2-core CPU).
tables: build
	for table in table1 table2 table3 table4 table5; do \
		$(PY) -m rcl_ops.train experiment $$table --output-dir runs --no-progress || exit 1; \
	done

# Side-by-side CPU benchmark at B=64, 3x64x64 (a few minutes); results in benchmarks/results/.
# The peers (POT, GeomLoss, KeOps) are installed here only: the library never needs them.
bench: build
	$(PIP) install --quiet pot geomloss pykeops matplotlib
	$(PY) -m benchmarks.run --device cpu --quick

# On a machine with a CUDA GPU and its own torch (PYTHON=/path/to/python): the staged check
# of scripts/gpu_check.sh, each stage appending to $(GPU_RESULTS)/ as it goes (a run cut off
# by its time limit keeps what it measured):
#   1. build for this GPU's architecture only, MAX_JOBS=nproc;
#   2. the tests marked "gpu" (CUDA backend, compiled Triton; `pytest --collect-only -q -m gpu tests`
#      on that machine lists them), 8 xdist workers, 240 s per test, no stop at the first
#      failure, JUnit XML in tests.xml;
#   3. the headline case (B=64, 3x128x128, every distance and the loss step, CUDA events, peak
#      memory) and the host-overhead case;
#   4. the B and M sweep, only with GPU_CHECK_FULL=1; 5. torch.profiler tables of the loss steps.
# Budget: stages 1-3 must fit in ~7 minutes on a 16-core H100/H200 machine. Measured on H200s
# (2026-11-26): build 30-46 s, the gpu tests 41-47 s, headline + overhead 37-44 s, profiles
# 10-12 s: 2-2.6 min in all, plus ~30 s to start and transfer. Each stage also has a wall limit
# (GPU_CHECK_TESTS_LIMIT, _BENCH_LIMIT, _PROFILE_LIMIT). Pick stages: GPU_CHECK_STAGES="2 3".
PYTHON ?= python3
GPU_RESULTS ?= gpu-check-results
gpu-check:
	PYTHON=$(PYTHON) GPU_RESULTS=$(GPU_RESULTS) bash scripts/gpu_check.sh

# Wheels of POT, GeomLoss and KeOps (benchmarks/peers.txt) for the GPU machine's python 3.12, which
# reaches no registry: gpu-check installs them from .peer-wheels/ when the folder travels along.
peer-wheels: $(DEPS_STAMP)
	PYTHON=$(PY) bash scripts/peer_wheels.sh download .peer-wheels

clean:
	rm -rf build $(GPU_RESULTS) rcl_ops/_C*.so $(EXT_STAMP) $(INSTALL_STAMP)
