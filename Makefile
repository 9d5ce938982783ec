# The two commands a new user needs (see README.md):
#   make repro   set up the environment and run the whole pipeline (dvc repro) on the embedded default
#   make test    set up the environment and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-all repro style clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(BIN)/activate

setup: $(BIN)/activate

test: setup
	$(BIN)/python -m pytest -q

repro: setup
	. $(BIN)/activate && dvc repro

clean:
	rm -rf $(VENV) .pytest_cache
