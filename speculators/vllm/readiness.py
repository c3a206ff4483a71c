"""Wait for a vLLM server to come up: ``/health`` answers 200 and ``/v1/models`` lists a model."""

from __future__ import annotations

import contextlib

import subprocess
import time
from typing import Callable

from speculators.errors import UserError
from speculators.process import ExitedEarly, Lifeline, Process, TimedOut, start, wait_ready


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


def port_in_use(base_url: str, timeout_s: float = 1.0) -> bool:
    """Whether something already accepts connections at the URL's host and port."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(base_url)
    try:
        socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def exit_message(base_url: str, returncode: int, cause: str | None) -> str:
    """Why the server is gone: its log's cause line first; `make vllm` only for a broken install."""
    from speculators.vllm.logcause import looks_like_a_broken_install

    text = f"the vLLM process exited with code {returncode} before {base_url} was ready"
    if cause:
        text += f": {cause}"
    else:
        text += "; see its log above"
    if cause is None or looks_like_a_broken_install(cause):
        text += (". If vLLM itself failed to import or start, reinstall it with `make vllm` "
                 "(python scripts/install_vllm.py); on a machine without CUDA it must run with "
                 "VLLM_TARGET_DEVICE=cpu (speculators sets it)")
    return text


def wait_until_ready(
    base_url: str,
    timeout_s: float = 900.0,
    poll_s: float = 2.0,
    process: Process | subprocess.Popen | None = None,
    sleep: Callable[[float], None] = time.sleep,
    api_key: str | None = None,
    log_lines: Callable[[], list[str]] | None = None,
) -> list[str]:
    """The served model ids once ready; fail fast if ``process`` exits (naming the cause found
    in ``log_lines()``), or after ``timeout_s``. With a ``process``, a server that answers is
    only believed while that process runs: a port answered by someone else never counts."""
    from speculators.vllm.logcause import cause_line

    try:
        return wait_ready(lambda: probe(base_url, api_key=api_key), timeout_s, poll_s, process=process,
                          log_lines=log_lines, cause=cause_line, sleep=sleep)
    except ExitedEarly as exc:
        raise ServerStartError(exit_message(base_url, exc.returncode, exc.cause)) from None
    except TimedOut:
        raise ServerStartError(
            f"{base_url} not ready after {timeout_s:g}s (/health and /v1/models); "
            "raise --ready-timeout for large models or check the server log"
        ) from None


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the server we started (for the rest
    of the process: a command's own entry; library code uses `sigterm_as_exit`)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_as_exit():
    """`exit_on_sigterm` for the block only: the previous SIGTERM handler is back afterwards, so
    a caller in the same process (a test, a notebook) keeps its own."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ManagedServer:
    """A vLLM server (`speculators.process`) that is stopped (TERM, then KILL) when the block ends.

    It runs under a group lifeline: its whole process group (vLLM's engine and workers
    included) is killed when this process dies, even by SIGKILL. Its output goes to
    ``log_file``, or is copied to our stdout with the last lines kept, so a server that dies
    is reported with the line that says why (`logcause`)."""

    def __init__(self, command: list[str], base_url: str, ready_timeout_s: float = 900.0, env: dict | None = None,
                 api_key: str | None = None, log_file=None):
        self.command = command
        self.base_url = base_url
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.api_key = api_key
        self.log_file = log_file  # an open file for the server's output (default: our stdout)
        self.process: Process | None = None
        self.model_ids: list[str] = []

    def spawn(self) -> Process:
        """Start the process without waiting for readiness. Refused when the port already
        answers: whatever holds it is not the server we are about to start."""
        if port_in_use(self.base_url):
            raise ServerStartError(
                f"{self.base_url} is already in use by another process: a server started earlier "
                "(stop it) or another program; pass a free --port after `--`")
        self.process = start(self.command, log=self.log_file, env=self.env, lifeline=Lifeline.GROUP)
        return self.process

    def start(self) -> "ManagedServer":
        self.spawn()
        try:
            self.model_ids = wait_until_ready(self.base_url, self.ready_timeout_s, process=self.process,
                                              api_key=self.api_key, log_lines=self.process.log_lines)
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is not None:
            self.process.stop(grace_s)

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
