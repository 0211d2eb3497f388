# Two entry points: `make demo` (the main job on the default models) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test test-fast lint install clean gpu-check gpu-check-deps

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mirror-sd demo $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -ra --durations=25 -n auto --dist loadfile --no-loadscope-reorder

# test-fast: the edit loop (< 2 min): the pure layers, the runtime on tiny torch models and
# the CLI's error contract; `make test` (CI) stays the complete suite.
FAST_TESTS ?= tests/partition tests/runtime tests/graphs/test_model.py tests/graphs/test_model_graph.py tests/devices/test_ort_core.py

test-fast: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x -m "not slow and not real_model" $(FAST_TESTS)

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info

# gpu-check: the prepared CUDA check (docs/gpu_check.md): the `cuda` tests, then ar /
# speculative / mirror timed on Qwen2-shaped random models, in at most 8 minutes; no install,
# no network. Without a CUDA GPU it says so and exits 0. gpu-check-deps copies the pure-Python
# dependencies a bare GPU machine may lack into build/gpu_check_deps (carry it along).
GPU_CHECK_OUT ?= out/gpu_check

gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

gpu-check-deps: $(BIN)/.installed
	bash scripts/gpu_check.sh --vendor-deps

# test-ep: the execution-provider tests in a venv of their own, because an EP build of
# onnxruntime (onnxruntime-openvino, onnxruntime-qnn, ...) replaces the `onnxruntime` module.
# Defaults run OpenVINO (device_type CPU); another EP, e.g.:
#   make test-ep EP_PACKAGE=onnxruntime-qnn EP_VENV=.venv-qnn EP_PROVIDER=QNNExecutionProvider EP_TESTS=qnn
EP_PACKAGE ?= onnxruntime-openvino
EP_VENV ?= .venv-openvino
EP_PROVIDER ?= OpenVINOExecutionProvider
EP_TESTS ?= openvino

.PHONY: test-ep

$(EP_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(EP_VENV)
	$(EP_VENV)/bin/pip install --quiet torch==2.13.0
	$(EP_VENV)/bin/pip install --quiet -e '.[dev]'
	$(EP_VENV)/bin/pip uninstall --yes --quiet onnxruntime $(EP_PACKAGE)
	$(EP_VENV)/bin/pip install --quiet $(EP_PACKAGE)
	touch $@

test-ep: $(EP_VENV)/.installed
	$(EP_VENV)/bin/python -c "import sys, onnxruntime as o; p = o.get_available_providers(); \
	sys.exit(0 if '$(EP_PROVIDER)' in p else f'$(EP_PROVIDER) missing from {p}')"
	$(EP_VENV)/bin/python -m pytest -q -ra tests/devices/test_ort.py -k $(EP_TESTS)
