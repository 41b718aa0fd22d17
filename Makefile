# The README's two commands: `make run` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install test lint typecheck run start stop status logs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider

run start stop status logs:
	@echo "make $@: not yet — the deploy issue brings the full stack (see README)"; exit 1

bench: install
	@echo "make bench: not yet — see bench/"; exit 1

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
