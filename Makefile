# vitkern: set up a virtual environment, run the benchmark suite (the main job) or the tests.
#   make bench   create .venv, install vitkern (building the CUDA extension when nvcc is found), run the benchmarks
#   make test    create .venv, install vitkern with its test extras, run the test suite
#   make lint    ruff over the tree (rules in pyproject.toml)
#   make compat  the GPU machines' stack (Python 3.12, torch 2.11, triton 3.6) in .venv-compat: full
#                static compile check and the ops' interpreter tests under it (scripts/compat_check.sh)
# Variables: PYTHON (interpreter that creates the venv), VENV, PYTEST_ARGS, BENCH_ARGS.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --durations=20
BENCH_ARGS ?=
STAMP := $(VENV)/.vitkern-installed

.PHONY: setup test bench lint compat clean

setup: $(STAMP)

# The build needs torch (and pybind11, ninja) importable before vitkern's setup.py runs, so they
# are installed first; --no-build-isolation keeps pip from fetching a second torch to build with.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/* tools/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt torch torchvision triton numpy pybind11 ninja
	$(PY) -m pip install -c constraints.txt -e ".[test,bench]" --no-build-isolation
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check .

compat:
	bash scripts/compat_check.sh

clean:
	rm -rf build build-cmake *.egg-info vitkern/*.so
