"""The vLLM controller: start a server process, wait for /health, stop it; and through a
real Celery worker on the `vllm` queue, report a clear error where vLLM is not installed."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap

import pytest
import redis

from runstore import open_store, repo
from runstore.settings import Settings
from worker.celery_app import make_celery
from worker.controller import start_deployment, stop_deployment
from worker.dispatch import flush_outbox
from worker.testing import start_worker, wait_for, worker_env

TEST_REDIS = os.environ.get("SPEC_TEST_REDIS_URL_CONTROLLER", "redis://127.0.0.1:6379/13")

# Stands in for a vLLM server: the controller only needs a process that answers /health.
SERVER = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    time.sleep(1.0)  # a server takes a moment to load
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_HOME", str(tmp_path))
    monkeypatch.setenv("SPEC_BROKER_URL", TEST_REDIS)
    s = Settings.from_env()
    s.ensure_dirs()
    return s


def test_start_waits_for_health_then_stop_kills_it(settings):
    factory = open_store(settings.db_url)
    port = _port()
    with factory() as s:
        dep = repo.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                      endpoint=f"http://127.0.0.1:{port}")
    argv = [sys.executable, "-c", SERVER, str(port)]
    assert start_deployment(factory, settings, dep.id, argv=argv) == "up"
    with factory() as s:
        d = repo.get_deployment(s, dep.id)
        assert d.status == "up" and d.pid and d.last_health_at
        pid = d.pid
    os.killpg(pid, 0)  # running in its own process group
    # a second draft deployment on the same port replaces the first
    with factory() as s:
        dep2 = repo.request_deployment(s, kind="draft", model_path="/ck2", run_id=None, port=port,
                                       endpoint=f"http://127.0.0.1:{port}")
    assert start_deployment(factory, settings, dep2.id, argv=argv) == "up"
    with factory() as s:
        assert repo.get_deployment(s, dep.id).status == "stopped"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert stop_deployment(factory, dep2.id) == "stopped"
    with factory() as s:
        assert repo.get_deployment(s, dep2.id).status == "stopped"


def test_server_that_exits_is_reported_failed(settings):
    factory = open_store(settings.db_url)
    with factory() as s:
        dep = repo.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=_port(), endpoint="x")
    argv = [sys.executable, "-c", "import sys; print('error: CUDA out of memory'); sys.exit(3)"]
    assert start_deployment(factory, settings, dep.id, argv=argv) == "failed"
    with factory() as s:
        assert repo.get_deployment(s, dep.id).error == "CUDA out of memory (exit code 3)"


@pytest.mark.slow
def test_serve_button_path_through_celery_without_vllm(settings, tmp_path):
    """What the dashboard's button does on a machine without vLLM: the controller runs the real
    `speculators serve` and the deployment ends failed with its message, not stuck."""
    client = redis.Redis.from_url(TEST_REDIS)
    client.flushdb()
    factory = open_store(settings.db_url)
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with factory() as s:
        dep = repo.request_deployment(s, kind="draft", model_path=str(ckpt), run_id=None, port=_port(),
                                      endpoint="http://127.0.0.1:1")
    assert flush_outbox(factory, make_celery(settings)) == (1, None)
    worker = start_worker(worker_env(settings.home, TEST_REDIS), queue="vllm", name="vllm@test",
                          log_path=tmp_path / "w.log")
    try:
        def done():
            with factory() as s:
                d = repo.get_deployment(s, dep.id)
                return d if d.status in ("failed", "up") else None
        d = wait_for(done, 90, what="deployment result")
        assert d.status == "failed"
        # the real `speculators serve` ran on this checkpoint and refused it with its own
        # error line: a broken serve path (wrong command, wrong checkpoint, a crash) says otherwise
        assert d.error.startswith(f"{ckpt / 'config.json'}: speculators_model_type"), d.error
        assert "is this a speculator checkpoint?" in d.error and d.error.endswith("(exit code 2)"), d.error
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        client.flushdb()
