# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint setup

# The CPU build of torch is installed first and pinned to the tested version, so that the package's
# range requirement (torch>=2.2,<3) never pulls a multi-gigabyte CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,graph]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/metagrad train --config sinusoid-10shot --out-dir runs/sinusoid-10shot-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rs

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
