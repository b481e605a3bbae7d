# One-command set-up, quickstart and tests. Each target installs what it needs first, once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SETUP_DONE := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test test-all lint clean

setup: $(SETUP_DONE)

# torch first, from the CPU pin, so that nothing later can pull a CUDA build.
$(SETUP_DONE): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $@

quickstart: setup
	$(BIN)/fedpeft simulate simulations/quickstart.toml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
