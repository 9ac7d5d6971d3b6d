# `make quickstart` and `make test` each install everything first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test lint bench

setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/agentrl train configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/engine.py
