# Two commands: `make run` and `make test`. Both create .venv on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/governor.toml

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/governor run --config $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check governor tests
	$(BIN)/mypy governor

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .governor .pytest_cache .mypy_cache .ruff_cache
