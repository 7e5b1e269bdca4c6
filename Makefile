# Two commands on a fresh machine: `make run` trains the tiny MoE model, `make test` runs the tests.
# Both create (or reuse) the virtualenv .venv in this checkout with sparse_train installed in it.
VENV ?= .venv
EXTRAS ?= dev,triton,hf,bench,sweep
CONFIG ?= configs/tiny-moe.yaml
PYTEST_ARGS ?=

.PHONY: venv run test test-slow test-all lint clean

venv:
	@VENV=$(VENV) EXTRAS=$(EXTRAS) scripts/ensure-venv.sh

run: venv
	$(VENV)/bin/sparse-train train --config $(CONFIG)

test: venv
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

test-all: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports   # the import contracts in pyproject.toml

clean:
	rm -rf $(VENV) runs .pytest_cache
