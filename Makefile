# Two commands do everything on a fresh machine:
#   make demo   - create .venv if missing, run `segpipe demo`
#   make test   - create .venv if missing, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-all test-gpu lint bench install clean

$(BIN)/segpipe: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(BIN)/segpipe

install: $(BIN)/segpipe

demo: $(BIN)/segpipe
	$(BIN)/segpipe demo
	@echo "segpipe is installed in $(BIN); to run the README's segpipe commands: source $(BIN)/activate"

test: $(BIN)/segpipe
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(BIN)/segpipe
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-gpu: $(BIN)/segpipe
	$(BIN)/python -m pytest -m gpu -s $(PYTEST_ARGS)
	$(BIN)/python -m bench.gpu

bench: $(BIN)/segpipe
	$(BIN)/python -m bench

lint: $(BIN)/segpipe
	$(BIN)/ruff check segpipe flows tests bench
	$(BIN)/ruff format --check segpipe flows tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) segpipe-demo
