"""Wait for a vLLM server to come up: ``/health`` answers 200 and ``/v1/models`` lists a model."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
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
    process: subprocess.Popen | None = None,
    sleep: Callable[[float], None] = time.sleep,
    api_key: str | None = None,
    log_lines: Callable[[], list[str]] | None = None,
) -> list[str]:
    """Poll until ready; fail fast if ``process`` exits (naming the cause found in
    ``log_lines()``), or after ``timeout_s``. With a ``process``, a server that answers is
    only believed while that process runs: a port answered by someone else never counts."""
    from speculators.vllm.logcause import cause_line

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            cause = cause_line(log_lines()) if log_lines else None
            raise ServerStartError(exit_message(base_url, process.returncode, cause))
        ids = probe(base_url, api_key=api_key)
        if ids and (process is None or process.poll() is None):
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
    """A server subprocess that is stopped (TERM, then KILL) when the block ends.

    It runs under a lifeline (`speculators.vllm.lifeline`): its whole process group (vLLM's
    engine and workers included) is killed when this process dies, even by SIGKILL. Its
    output goes to ``log_file``, or is copied to our stdout with the last lines kept, so a
    server that dies is reported with the line that says why (`logcause`)."""

    def __init__(self, command: list[str], base_url: str, ready_timeout_s: float = 900.0, env: dict | None = None,
                 api_key: str | None = None, log_file=None):
        self.command = command
        self.base_url = base_url
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.api_key = api_key
        self.log_file = log_file  # an open file for the server's output (default: our stdout)
        self.process: subprocess.Popen | None = None
        self.model_ids: list[str] = []
        self._tail: "collections.deque[str]" = collections.deque(maxlen=2000)
        self._pump: threading.Thread | None = None

    def spawn(self) -> subprocess.Popen:
        """Start the process without waiting for readiness. Refused when the port already
        answers: whatever holds it is not the server we are about to start."""
        from speculators.vllm.lifeline import wrap

        if port_in_use(self.base_url):
            raise ServerStartError(
                f"{self.base_url} is already in use by another process: a server started earlier "
                "(stop it) or another program; pass a free --port after `--`")
        out = self.log_file if self.log_file is not None else subprocess.PIPE
        try:
            # Own process group led by the lifeline: vLLM forks engine/worker processes that
            # must stop with it, and with us.
            self.process = subprocess.Popen(wrap(self.command), env=self.env, start_new_session=True,
                                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise ServerStartError(f"cannot run {self.command[0]!r}: {exc}") from exc
        if self.log_file is None:
            self._pump = threading.Thread(target=self._copy, args=(self.process.stdout,), daemon=True)
            self._pump.start()
        return self.process

    def _copy(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def log_lines(self) -> list[str]:
        """The server's output so far (its log file's end, or the lines copied to stdout)."""
        from speculators.vllm.logcause import read_lines

        if self.log_file is not None:
            try:
                self.log_file.flush()
            except (OSError, ValueError, AttributeError):
                pass
            return read_lines(getattr(self.log_file, "name", None))
        if self._pump is not None:
            self._pump.join(timeout=2)  # the output of a process that just exited
        return list(self._tail)

    def start(self) -> "ManagedServer":
        self.spawn()
        try:
            self.model_ids = wait_until_ready(self.base_url, self.ready_timeout_s, process=self.process,
                                              api_key=self.api_key, log_lines=self.log_lines)
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
