# Two entry points (see README): `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench

$(BIN)/ledger: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/ledger

serve: $(BIN)/ledger
	$(BIN)/ledger serve

test: $(BIN)/ledger
	$(BIN)/ruff check ledger api tests bench examples
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/ledger
	$(BIN)/python bench/core.py
