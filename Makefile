# Everything a fresh machine needs: `make demo` runs the main job on the built-in example,
# `make test` runs lint and the test suite. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): Makefile pyproject.toml plugins/zoo-caffemodel/pyproject.toml  # Makefile: a new install step reaches existing venvs
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q -e ./plugins/zoo-caffemodel  # installed like any third-party plugin (editable: edits apply)
	$(BIN)/pip install -q --no-deps tf-keras==2.21.0  # real Keras 2 for tests/test_keras2_real.py; --no-deps: its `tensorflow` requirement would pull the full tensorflow wheel over tensorflow_cpu
	touch $@

.PHONY: install demo test lint bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

lint: $(STAMP)
	$(BIN)/ruff check .

# two workers (pytest-xdist) where there are two CPUs: 7-8 min instead of 11.5 on 2 cores; at most two, as each
# may hold a full-size model beside TensorFlow (5.8 GB peak). loadgroup: the tests that write full-size VGG16
# files share one worker (tests/conftest.py, VGG16_FILES), so the disk holds one such set at a time
test: lint
	$(BIN)/pytest -q -n auto --maxprocesses 2 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py
