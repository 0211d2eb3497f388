# Two entry points: `make demo` (the main job on the default models) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mirror-sd demo $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check mirror_sd tests benchmarks examples
	$(BIN)/ruff format --check mirror_sd tests benchmarks examples
	$(BIN)/python -m pytest -q -ra

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix mirror_sd tests benchmarks examples
	$(BIN)/ruff format mirror_sd tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
