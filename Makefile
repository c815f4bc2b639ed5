# The two front-door commands: `make demo` and `make test`. Both set up .venv first if needed.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/autocompress run

test: setup
	$(BIN)/python -m pytest -q
