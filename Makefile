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

.PHONY: all test lint format demo bench build gpu-check clean

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

$(EXT_STAMP): $(INSTALL_STAMP) $(CSRC)
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

test: build lint
	$(PY) -m pytest -q tests

# Distances between residuals of real images, then the reference trainer's quick preset
# (RCL-EMD, N2N, N2S, Oracle: pre-train, proxy-evaluate, table, plots) on bundled images.
demo: build
	$(PY) -m rcl_ops.demo
	$(PY) -m rcl_ops.train --preset quick --output-dir runs

# Side-by-side CPU benchmark at B=64, 3x64x64 (a few minutes); results in benchmarks/results/.
# The peers (POT, GeomLoss, KeOps) are installed here only: the library never needs them.
bench: build
	$(PIP) install --quiet pot geomloss pykeops matplotlib
	$(PY) -m benchmarks.run --device cpu --quick

# On a machine with a CUDA GPU and its own torch (PYTHON=/path/to/python): build in place
# with that torch, run the whole suite on CUDA and the benchmarks, write the results.
PYTHON ?= python3
GPU_RESULTS ?= gpu-check-results
gpu-check:
	mkdir -p $(GPU_RESULTS)
	$(PYTHON) -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA GPU'; print(torch.cuda.get_device_name())" | tee $(GPU_RESULTS)/device.txt
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} RCL_OPS_WITH_CUDA=1 $(PYTHON) setup.py --quiet build_ext --inplace 2>&1 | tail -n 20 | tee $(GPU_RESULTS)/build.txt
	$(PYTHON) -m pytest -q -rs tests 2>&1 | tee $(GPU_RESULTS)/tests.txt
	$(PYTHON) -m benchmarks.run --device cuda --full --output-dir $(GPU_RESULTS) 2>&1 | tee $(GPU_RESULTS)/bench.txt

clean:
	rm -rf build $(GPU_RESULTS) rcl_ops/_C*.so $(EXT_STAMP) $(INSTALL_STAMP)
