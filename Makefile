# The two commands a new user needs (see README.md):
#   make repro   set up the environment and run the whole pipeline (dvc repro) on the embedded default
#   make test    set up the environment, lint (ruff check + ruff format --check, DVC deps = import closure), then
#                run the whole test suite (what CI runs): the default tier (incl. the end-to-end dvc repro and the
#                Ray Tune search), then the slow tier (Ray head + job submit, S3 server on loopback, fault injection)
#   make lint    only the lint step;  make format  apply ruff format + ruff check --fix
#   make test-fast   only the default tier (= plain `pytest`, addopts in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup lint format test test-fast test-slow repro clean

$(BIN)/activate: pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(BIN)/activate

setup: $(BIN)/activate

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/dvc_deps.py --check

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint test-fast test-slow

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

repro: setup
	. $(BIN)/activate && dvc repro

clean:
	rm -rf $(VENV) .pytest_cache
