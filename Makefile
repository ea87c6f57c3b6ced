# Two entry points: `make demo` (the main job on the embedded corpus) and `make test` (the test suite).
# Each creates the virtual environment on first use and reinstalls when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,faces]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segue demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check segue_dist tests bench
	$(BIN)/ruff format --check segue_dist tests bench

clean-demo:
	rm -rf runs/demo
