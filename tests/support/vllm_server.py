"""Real vLLM servers for the integration tests: one way to start them, one way to report a start
that fails (with the server's own log), and a count of the starts.

A vLLM start costs a minute or more of CI on two cores, so the count is the figure to watch:
each start is printed (``vLLM start #n``) and, when ``SPEC_TEST_VLLM_STARTS`` names a file,
appended to it as one JSON line (label, seconds to ready), which survives pytest's capture.

`SharedLaunchVllm` is one `launch-vllm` hidden-states server that several test modules use
(tests/test_online_endpoints.py, tests/test_real_vllm.py): started on first use, stopped by a
module that needs the machine for another server, started again if a later module asks for it.
Tests read only deltas of its counters, so sharing it couples no results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

READY_TIMEOUT_S = 900.0
STARTS_ENV = "SPEC_TEST_VLLM_STARTS"
_starts = 0


def require_vllm() -> None:
    """The real-engine tests never skip: without vLLM they fail, saying how to install it."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed in this environment: run `make vllm` "
                    "(python scripts/install_vllm.py) -- the real-engine tests must not be skipped")


def starts_so_far() -> int:
    """vLLM starts made by this test process (ready or refused)."""
    return _starts


def record_start(label: str, seconds: float, outcome: str) -> None:
    global _starts
    _starts += 1
    print(f"vLLM start #{_starts} ({label}): {outcome} in {seconds:.0f}s", flush=True)
    path = os.environ.get(STARTS_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"n": _starts, "label": label, "outcome": outcome, "seconds": round(seconds, 1),
                                 "pid": os.getpid()}) + "\n")


def _log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


class StartedServer:
    """A `ManagedServer` with its log file; `stop()` is idempotent."""

    def __init__(self, server, log: Path, fh):
        self.server, self.log, self._fh = server, log, fh

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def model_ids(self) -> list[str]:
        return self.server.model_ids

    @property
    def process(self):
        return self.server.process

    def stop(self) -> None:
        self.server.stop()
        if not self._fh.closed:
            self._fh.close()


def spawn(argv: Sequence[str], url: str, log: Path, *, env: dict | None = None):
    """Start a server process without waiting (several boot at once); `wait_ready` it next."""
    from speculators.vllm.readiness import ManagedServer

    fh = open(log, "w")
    server = ManagedServer(list(argv), url, READY_TIMEOUT_S, env=dict(os.environ) if env is None else env,
                           log_file=fh)
    server.spawn()
    return StartedServer(server, log, fh), time.monotonic()


def wait_ready(started: StartedServer, t0: float, label: str) -> StartedServer:
    """Wait for a spawned server; a server that dies or never answers fails the test with its log."""
    from speculators.vllm.readiness import wait_until_ready

    try:
        started.server.model_ids = wait_until_ready(started.base_url, READY_TIMEOUT_S, process=started.process,
                                                    log_lines=started.process.log_lines)
    except BaseException as exc:  # noqa: BLE001 - reported with the server's own log
        record_start(label, time.monotonic() - t0, "failed")
        started.stop()
        pytest.fail(f"{label}: {exc}\n--- server log tail ---\n{_log_tail(started.log)}")
    record_start(label, time.monotonic() - t0, "ready")
    return started


def start(argv: Sequence[str], url: str, log: Path, label: str, *, env: dict | None = None) -> StartedServer:
    """A server subprocess, ready (its /health and /v1/models answer), its output in `log`."""
    started, t0 = spawn(argv, url, log, env=env)
    return wait_ready(started, t0, label)


@contextlib.contextmanager
def running(argv: Sequence[str], url: str, log: Path, label: str, *, env: dict | None = None) -> Iterator[StartedServer]:
    """`start`, stopped when the block ends."""
    started = start(argv, url, log, label, env=env)
    try:
        yield started
    finally:
        started.stop()


def expect_refusal(argv: Sequence[str], url: str, log: Path, label: str, *, env: dict | None = None):
    """A server start that must fail: returns the `ServerStartError` (counted as a start)."""
    from speculators.vllm.readiness import ManagedServer, ServerStartError

    t0 = time.monotonic()
    with open(log, "w") as fh:
        server = ManagedServer(list(argv), url, READY_TIMEOUT_S, env=env, log_file=fh)
        try:
            server.start()
        except ServerStartError as exc:
            record_start(label, time.monotonic() - t0, "refused")
            return exc
        server.stop()
    record_start(label, time.monotonic() - t0, "ready")
    pytest.fail(f"{label}: the server started, but it should have been refused")


def serve_command(checkpoint: Path, vllm_version: str, extra: Sequence[str] = (), kv_cache_gib: int | None = None):
    """The `vllm serve` command `speculators serve` runs for `checkpoint` on `vllm_version`
    (its plan: checkpoint as the model, or the verifier plus --speculative-config on 0.33+),
    on a free port. Returns (command, plan)."""
    from speculators.vllm.launch import build_vllm_command
    from speculators.vllm.readiness import free_port
    from speculators.vllm.serve import read_speculator_config, resolve_checkpoint, serve_plan

    ckpt = resolve_checkpoint(checkpoint)
    plan = serve_plan(ckpt, read_speculator_config(ckpt), vllm_version)
    cmd = build_vllm_command(plan.model, [*plan.args, "--port", str(free_port()), *extra], kv_cache_gib=kv_cache_gib)
    return cmd, plan


def launch_vllm_argv(verifier: Path, layers: Sequence[int], hidden_states_path: Path, port: int) -> list[str]:
    """`speculators launch-vllm` on `verifier` exporting `layers` (+ final), on `port`."""
    return [sys.executable, "-m", "speculators", "launch-vllm", str(verifier),
            "--target-layer-ids", *map(str, layers), "--hidden-states-path", str(hidden_states_path),
            "--ready-timeout", str(READY_TIMEOUT_S), "--", "--port", str(port)]


# ---------------------------------------------------------------- the shared launch-vllm server
SHARED_LAYERS = [1, 3, 6]  # custom aux layers, deliberately not the defaults [2, 4, 5]
SHARED_HIDDEN = 128  # 4 heads: head_dim 32, the smallest vLLM's CPU attention runs
SHARED_NUM_LAYERS = 8
SHARED_VLLM_ARGS = "--enforce-eager --max-model-len 512 --max-num-seqs 8"  # no --dtype: the CPU default is fp32


def shared_verifier(path: Path) -> Path:
    """The verifier of the shared server: tiny Llama, matrices at std 0.05 (`varied_verifier`:
    greedy text with short cycles and breaks, so acceptance lands between 1 and K + 1)."""
    from tests.support.constant_draft import varied_verifier

    return varied_verifier(path, hidden_size=SHARED_HIDDEN, num_layers=SHARED_NUM_LAYERS)


@dataclass
class SharedLaunchVllm:
    """One `launch-vllm` server on `verifier` exporting `SHARED_LAYERS`, for the whole session."""

    verifier: Path
    work: Path
    _server: StartedServer | None = field(default=None, repr=False)
    _generation: int = 0

    @property
    def hidden_states_path(self) -> Path:
        return self.work / "vllm_hidden_states"

    def ensure(self) -> StartedServer:
        """The running server, started (again) if needed, with the flags every user expects."""
        if self._server is not None and self._server.process.poll() is None:
            return self._server
        from speculators.vllm.readiness import free_port

        self._generation += 1
        port = free_port()
        self._server = start(launch_vllm_argv(self.verifier, SHARED_LAYERS, self.hidden_states_path, port),
                             f"http://127.0.0.1:{port}", self.work / f"launch_vllm_{self._generation}.log",
                             "shared launch-vllm", env=self.env())
        return self._server

    def env(self) -> dict:
        """The environment of the shared server, for another server that must match it."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["SPECULATORS_VLLM_ARGS"] = SHARED_VLLM_ARGS
        return env

    @property
    def log(self) -> Path:
        return self.work / f"launch_vllm_{self._generation}.log"

    def stop(self) -> None:
        """Stop it (one vLLM at a time on a 2-core machine); SIGTERM to launch-vllm must stop vLLM too."""
        if self._server is None:
            return
        import requests

        server, self._server = self._server, None
        server.stop()
        try:
            requests.get(server.base_url + "/health", timeout=5)
        except requests.ConnectionError:
            return
        raise AssertionError(f"{server.base_url} still answers after launch-vllm was stopped: vLLM outlived it")
