# The front-door commands: `make demo`, `make test` and `make lint` (the import layers in pyproject.toml). Each sets
# up .venv first if needed.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/autocompress run

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/lint-imports
