"""Wait for a vLLM server to come up: ``/health`` answers 200 and ``/v1/models`` lists a model."""

from __future__ import annotations

import subprocess
import time
from typing import Callable

from speculators.errors import UserError


class ServerStartError(UserError):
    """The server process died, or never became ready within the timeout."""


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port (for a server this process is about to start)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def probe(base_url: str, timeout_s: float = 5.0, api_key: str | None = None) -> list[str] | None:
    """Model ids when the server is ready, else None (never raises on network errors)."""
    import requests

    from speculators.vllm.launch import auth_headers

    try:
        health = requests.get(base_url + "/health", timeout=timeout_s)
        if health.status_code != 200:
            return None
        models = requests.get(base_url + "/v1/models", timeout=timeout_s, headers=auth_headers(api_key))
        if models.status_code != 200:
            return None
        ids = [m.get("id") for m in models.json().get("data", []) if isinstance(m, dict)]
        return ids or None
    except (requests.RequestException, ValueError, AttributeError):
        return None


def wait_until_ready(
    base_url: str,
    timeout_s: float = 900.0,
    poll_s: float = 2.0,
    process: subprocess.Popen | None = None,
    sleep: Callable[[float], None] = time.sleep,
    api_key: str | None = None,
) -> list[str]:
    """Poll until ready; fail fast if ``process`` exits, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"the vLLM process exited with code {process.returncode} before {base_url} was ready; "
                "see its log above. If vLLM itself failed to import or start, reinstall it with "
                "`make vllm` (python scripts/install_vllm.py); on a machine without CUDA it must run "
                "with VLLM_TARGET_DEVICE=cpu (speculators sets it)"
            )
        ids = probe(base_url, api_key=api_key)
        if ids:
            return ids
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{base_url} not ready after {timeout_s:g}s (/health and /v1/models); "
                "raise --ready-timeout for large models or check the server log"
            )
        sleep(poll_s)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the server we started."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, handler)


class ManagedServer:
    """A server subprocess that is stopped (TERM, then KILL) when the block ends."""

    def __init__(self, command: list[str], base_url: str, ready_timeout_s: float = 900.0, env: dict | None = None,
                 api_key: str | None = None, log_file=None):
        self.command = command
        self.base_url = base_url
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.api_key = api_key
        self.log_file = log_file  # an open file for the server's output (default: inherit)
        self.process: subprocess.Popen | None = None
        self.model_ids: list[str] = []

    def spawn(self) -> subprocess.Popen:
        """Start the process without waiting for readiness."""
        try:
            # Own process group: vLLM forks engine/worker processes that must stop with it.
            self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                            stdout=self.log_file, stderr=subprocess.STDOUT if self.log_file else None)
        except OSError as exc:
            raise ServerStartError(f"cannot run {self.command[0]!r}: {exc}") from exc
        return self.process

    def start(self) -> "ManagedServer":
        self.spawn()
        try:
            self.model_ids = wait_until_ready(self.base_url, self.ready_timeout_s, process=self.process,
                                              api_key=self.api_key)
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        import os
        import signal

        proc = self.process
        if proc is None:
            return

        def signal_group(sig: int) -> None:
            try:
                os.killpg(proc.pid, sig)  # the group we created (pgid == pid)
            except (ProcessLookupError, PermissionError):
                pass

        if proc.poll() is None:
            signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                signal_group(signal.SIGKILL)
                proc.wait()
        signal_group(signal.SIGKILL)  # stragglers of an exited leader

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
