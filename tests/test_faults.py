"""Fault injection: the service under the faults of issue 15, one test per fault, each with
real processes (an own redis-server on a free port, real Celery workers, the real local-mode
launcher, headless Chromium where the UI is involved). Each fault ends in a run that
finishes, or fails with a clear reason, with nothing lost.

 1  first start: dashboard up at once while the tiny verifier builds, progress shown
    -> test_dashboard_answers_while_the_tiny_verifier_builds
 2  a child dying (dashboard, worker) stops nothing else; a stage survives a dashboard restart
    -> test_children_restart_alone_and_the_run_finishes
 3  a broker blip while a stage finishes; a message lost in the broker (the reconciler)
    -> test_broker_blip_while_a_stage_finishes, test_reconciler_requeues_a_lost_run_once
 4  two installations on one Redis -> test_two_installations_share_a_redis_without_crosstalk
 6  unreachable vLLM URL fails fast, the endpoint's health shown; 8 healthcheck while busy
    -> test_busy_worker_is_healthy_and_an_unreachable_endpoint_fails_fast
 7  kill/OOM error text -> test_sigkilled_stage_says_killed_signal_9;
    waiting between stages, no acceptance for 0 drafted tokens, plain-text names
    -> test_dashboard_shows_waiting_plain_names_and_no_fake_acceptance (browser)
 9  no SIGKILL by a PID from the database; hidden_dir checked; servers stopped by handle
    -> test_recovery_and_controller_never_signal_a_pid_from_the_database,
       test_controller_refuses_hidden_dir_outside_the_runs_root
 8  compose (device ids, healthcheck, no top-level name): tests/test_compose_files.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from runstore import deployments, metrics, open_store, outbox, runs, stages
from runstore.settings import Settings
from speculators.config.run import RunSettings
from speculators.vllm.readiness import free_port
from worker.celery_app import make_celery
from worker.dispatch import flush_outbox

from tests.support.browser_support import dashboard_healthy
from tests.support.stage_gate import StageGate
from tests.support.store import local_model, submit_run
from tests.support.wait import wait_for
from tests.support.workers import run_with_stages, start_worker, worker_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("SPEC_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


class RedisServer:
    """An own redis-server (no persistence) that a test can stop and start on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir, self.proc = free_port(), workdir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("these tests need redis-server on PATH (apt-get install redis-server)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 20, what="redis-server")

    def ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _submit(settings: Settings, model: Path, *, send: bool = True, **over):
    """A tiny offline run stored with its start message, as the form does."""
    fields = dict(name="fault run", model=str(local_model(settings, model)), dataset="sharegpt", seq_length=64,
                  max_samples=8, draft_vocab_size=64, epochs=1, lr=3e-3, ttt_steps=2, num_layers=1, mode="offline",
                  gpus=0)
    fields.update(over)
    return submit_run(settings, RunSettings(**fields), send=send)


def _finished(factory, run_id):
    run, _ = run_with_stages(factory, run_id)
    return run.status in ("succeeded", "failed", "cancelled")


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------- 3: broker blip, reconciler


def test_broker_blip_while_a_stage_finishes(redis_server, tiny_llama, tmp_path, spec_home):
    """Redis dies while `prepare` runs and is back (empty: no persistence) after it ended. The
    next stage was written to the outbox with prepare's success, so the worker's dispatcher
    sends it when Redis answers again: the run finishes, each stage ran once. (Prepare's
    process is held at its start until Redis is down: a prepare ending first would send its
    successor to the Redis about to lose it.)"""
    settings = spec_home(tmp_path / "home", BROKER_URL=redis_server.url)
    factory, run_id = _submit(settings, tiny_llama)
    gate = StageGate(tmp_path / "gate", "prepare-data")
    env = gate.env(worker_env(settings.home, redis_server.url))
    worker = start_worker(env, log_path=tmp_path / "worker.log")
    try:
        wait_for(gate.held, 120, what="prepare running (held at its start)")
        assert run_with_stages(factory, run_id)[1]["prepare"].status == "running"
        redis_server.stop()
        gate.release()
        wait_for(lambda: run_with_stages(factory, run_id)[1]["prepare"].status != "running", 300, what="prepare end")
        run, by_stage = run_with_stages(factory, run_id)
        assert by_stage["prepare"].status == "succeeded", by_stage["prepare"].error
        with factory() as s:
            pending = outbox.pending(s)
        assert [m.payload["stages"][0] for m in pending] == ["vocab"]  # kept, not lost
        assert run.status == "queued" and run.current_stage == "vocab"

        def refused():  # the worker tried to send it while Redis was down, and kept it
            with factory() as s:
                return [m.last_error for m in outbox.pending(s) if m.last_error]
        assert "cannot connect to Redis" in wait_for(refused, 60, what="a send refused")[0]
        redis_server.start()
        wait_for(lambda: _finished(factory, run_id), 600, what="run end")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "succeeded", (run.error, (tmp_path / "worker.log").read_text()[-3000:])
        assert {n: x.attempts for n, x in by_stage.items()} == {n: 1 for n in by_stage}
    finally:
        gate.release()
        _stop(worker)


def test_reconciler_requeues_a_lost_run_once(redis_server, tiny_llama, tmp_path, spec_home):
    """The start message is sent, then lost in the broker (its queue deleted). Restart
    recovery finds nothing (no stage was running); the reconciler in the worker sees the run
    due, an empty queue and no pending message, and queues it once: the run finishes with
    every stage run once. Reconciling a run that has its message is a no-op."""
    settings = spec_home(tmp_path / "home", BROKER_URL=redis_server.url)
    factory, run_id = _submit(settings, tiny_llama)
    app = make_celery(settings)
    client = redis.Redis.from_url(redis_server.url)
    prefix = app.conf.broker_transport_options["global_keyprefix"]
    assert client.llen(prefix + "gpu") == 1

    from worker.reconcile import reconcile

    assert reconcile(factory, app, grace_s=0) == []  # its message is queued: nothing to do
    client.delete(prefix + "gpu")  # the broker loses it
    env = worker_env(settings.home, redis_server.url, SPEC_RECONCILE_EVERY_S="2", SPEC_RECONCILE_GRACE_S="3")
    worker = start_worker(env, log_path=tmp_path / "worker.log")
    try:
        wait_for(lambda: _finished(factory, run_id), 600, what="run end")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "succeeded", (run.error, (tmp_path / "worker.log").read_text()[-3000:])
        assert {n: x.attempts for n, x in by_stage.items()} == {n: 1 for n in by_stage}
        assert "was due but not queued" in (tmp_path / "worker.log").read_text()
        assert reconcile(factory, app, grace_s=0) == []  # finished: never queued again
    finally:
        _stop(worker)


# ----------------------------------------------------------------- 4: namespaces


def test_two_installations_share_a_redis_without_crosstalk(redis_server, tiny_llama, tmp_path, spec_home):
    """Home B's worker runs on the same Redis DB as home A. A's run is not taken by B (before
    the fix B consumed it, found no such run in its database and dropped it): B's consumer
    polls Redis (BRPOP, seen through MONITOR) after A's message is queued, and names only its
    own queues. A's own worker then runs it."""
    settings_b = spec_home(tmp_path / "b", BROKER_URL=redis_server.url)
    worker_b = start_worker(worker_env(settings_b.home, redis_server.url), name="gpu0@b",
                            log_path=tmp_path / "b.log")
    try:
        wait_for(lambda: "ready" in (tmp_path / "b.log").read_text(), 120, what="worker B ready")
        settings_a = spec_home(tmp_path / "a", BROKER_URL=redis_server.url)
        assert settings_a.broker_namespace != settings_b.broker_namespace
        a_queue = settings_a.broker_namespace + ":gpu"
        with redis.Redis.from_url(redis_server.url, socket_timeout=60).monitor() as monitor:
            factory, run_id = _submit(settings_a, tiny_llama)
            polls = _polls_after(monitor, lambda c: c.startswith("LPUSH ") and f" {a_queue} " in c, 2, 60)
        assert all(f" {settings_b.broker_namespace}:gpu " in p and settings_a.broker_namespace not in p
                   for p in polls), polls
        assert "Received task" not in (tmp_path / "b.log").read_text()
        client = redis.Redis.from_url(redis_server.url)
        assert client.llen(settings_a.broker_namespace + ":gpu") == 1  # still waiting for A
        assert run_with_stages(factory, run_id)[0].status == "queued"
    finally:
        _stop(worker_b)
    worker_a = start_worker(worker_env(settings_a.home, redis_server.url), name="gpu0@a",
                            log_path=tmp_path / "a.log")
    try:
        wait_for(lambda: run_with_stages(factory, run_id)[1]["prepare"].status in ("running", "succeeded"), 120,
                 what="A's worker takes A's run")
        with factory() as s:
            runs.request_cancel(s, run_id)
        wait_for(lambda: _finished(factory, run_id), 60, what="cancelled")
    finally:
        _stop(worker_a)


def _polls_after(monitor, pushed, count: int, timeout: float) -> list[str]:
    """The first `count` BRPOPs (kombu's consumer polls, each naming every queue it takes)
    that Redis ran after the first command for which `pushed` holds, from a MONITOR."""
    deadline, seen, polls = time.monotonic() + timeout, False, []
    while len(polls) < count:
        assert time.monotonic() < deadline, f"no {count} polls after the push within {timeout:.0f} s"
        command = monitor.next_command()["command"]
        if seen and command.startswith("BRPOP "):
            polls.append(command + " ")
        seen = seen or pushed(command + " ")
    return polls


# ----------------------------------------------------------------- 6 + 8: endpoint, healthcheck


class _Verifier(BaseHTTPRequestHandler):
    code = 503  # vLLM answers 503 on /health while it loads

    def do_GET(self):  # noqa: N802
        self.send_response(type(self).code if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_busy_worker_is_healthy_and_an_unreachable_endpoint_fails_fast(redis_server, tiny_llama, tmp_path,
                                                                       spec_home):
    """An online run's verifier stage waits on a user's vLLM URL that answers 503 (loading):
    the stage shows the endpoint's health, the busy worker's liveness file stays fresh (while
    `celery inspect ping`, the old healthcheck, gets no reply), and once the URL stops
    answering connections the run fails within the limit, saying the endpoint is unreachable."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Verifier)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    settings = spec_home(tmp_path / "home", BROKER_URL=redis_server.url)
    factory, run_id = _submit(settings, tiny_llama, send=False, mode="online", vllm_endpoint=url)
    with factory() as s:  # prepare and vocab done earlier: start at the verifier stage
        for name in ("prepare", "vocab"):
            stages.start_stage(s, run_id, name, worker="earlier", log_path="/dev/null")
            stages.finish_stage(s, run_id, name, "succeeded")
        for m in outbox.pending(s):
            outbox.mark_sent(s, m.id)
        assert runs.requeue(s, run_id) == ["verifier", "train"]
    assert flush_outbox(factory, make_celery(settings))[1] is None
    env = worker_env(settings.home, redis_server.url, SPEC_ENDPOINT_UNREACHABLE_S="6")
    worker = start_worker(env, log_path=tmp_path / "worker.log")
    try:
        def note():
            stage = run_with_stages(factory, run_id)[1]["verifier"]
            return stage.status == "running" and stage.error and "HTTP 503" in stage.error
        wait_for(note, 120, what="the endpoint's health on the stage")
        py = [sys.executable, "-m"]
        ok = subprocess.run(py + ["worker.health", "gpu0@test", "--max-age", "30"], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        ping = subprocess.run(py + ["celery", "-A", "worker.celery_app", "inspect", "ping", "-d", "gpu0@test",
                                    "--timeout", "3"], env=env, cwd=str(ROOT), capture_output=True, text=True,
                              timeout=120)
        # the old healthcheck: no reply from a busy solo worker
        assert ping.returncode != 0 and "No nodes replied" in ping.stdout + ping.stderr, ping.stdout + ping.stderr
        server.shutdown()
        server.server_close()
        wait_for(lambda: _finished(factory, run_id), 180, what="run failed")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "failed"
        # failed by the unreachable rule with the limit set above, not by the 30-minute health wait
        assert f"the vLLM endpoint {url} is unreachable (connection refused for 6 s)" in run.error
        assert by_stage["train"].attempts == 0
        assert f"{url}/health: HTTP 503" in Path(by_stage["verifier"].log_path).read_text()
    finally:
        _stop(worker)
        server.server_close()


# ----------------------------------------------------------------- 7: killed stages


def test_sigkilled_stage_says_killed_signal_9(redis_server, tiny_llama, tmp_path, spec_home):
    """The OOM killer's SIGKILL, simulated on the stage's process: the run fails with
    `killed (signal 9: SIGKILL)` and the OOM hint, not a log header line."""
    settings = spec_home(tmp_path / "home", BROKER_URL=redis_server.url)
    factory, run_id = _submit(settings, tiny_llama)
    gate = StageGate(tmp_path / "gate", "prepare-data")  # prepare cannot end before the kill
    worker = start_worker(gate.env(worker_env(settings.home, redis_server.url)), log_path=tmp_path / "worker.log")
    try:
        pid = wait_for(gate.held, 120, what="prepare running (held at its start)")
        wait_for(lambda: run_with_stages(factory, run_id)[1]["prepare"].pid == pid, 60, what="the stage's pid")
        os.kill(pid, signal.SIGKILL)
        gate.release()
        wait_for(lambda: _finished(factory, run_id), 120, what="run failed")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "failed"
        assert by_stage["prepare"].error.startswith("killed (signal 9: SIGKILL)"), by_stage["prepare"].error
        assert "out-of-memory" in by_stage["prepare"].error and "===" not in run.error
        with factory() as s:  # nothing lost: it resumes from the killed stage
            assert runs.resume_run(s, run_id) == ["prepare", "vocab", "datagen", "train"]
            runs.request_cancel(s, run_id)
    finally:
        gate.release()
        _stop(worker)


# ----------------------------------------------------------------- 9: process control, hidden_dir


def test_recovery_and_controller_never_signal_a_pid_from_the_database(tmp_path, spec_home):
    """A stage row and a deployment row name the PID of an unrelated process (a PID reused, or
    one recorded by another worker). Restart recovery and the controller's stop leave it
    alone; the run is still marked interrupted and resumable, the deployment stopped."""
    settings = spec_home(tmp_path / "home", BROKER_URL="redis://127.0.0.1:1/0")
    factory = open_store(settings.db_url)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        with factory() as s:
            runs.create_run(s, run_id="r1", name="r", spec={}, stages=["prepare"], work_dir=str(tmp_path / "r1"))
            stage = stages.start_stage(s, "r1", "prepare", worker="gpu0@elsewhere", log_path="/dev/null")
            stages.set_stage_pid(s, stage.id, bystander.pid)
            stage = stages.get_stage(s, "r1", "prepare")
            stage.heartbeat_at = stage.heartbeat_at.replace(year=2000)
            s.commit()
            assert stages.recover_interrupted(s, worker="gpu0@here", stale_after_s=60) == [("r1", "prepare")]
            assert runs.get_run(s, "r1").status == "interrupted"
        from worker.controller import stop_deployment

        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path="/ck", run_id=None, port=1, endpoint="x")
            deployments.update_deployment(s, dep.id, status="up", pid=bystander.pid)
        assert stop_deployment(factory, dep.id) == "stopped"
        time.sleep(0.5)
        assert bystander.poll() is None  # still running: nobody signalled it
        with factory() as s:
            assert deployments.get_deployment(s, dep.id).status == "stopped"
    finally:
        bystander.kill()
        bystander.wait()


def test_controller_refuses_hidden_dir_outside_the_runs_root(tmp_path, spec_home):
    """The verifier's hidden-state directory comes from a broker message: one outside the
    runs root (or with `..`) is refused before anything starts."""
    settings = spec_home(tmp_path / "home", BROKER_URL="redis://127.0.0.1:1/0")
    factory = open_store(settings.db_url)
    from worker.controller import start_deployment

    for bad in ("/etc", str(settings.runs_root / ".." / "x"), "relative/dir"):
        with factory() as s:
            dep = deployments.request_deployment(s, kind="verifier", model_path="m", run_id=None, port=free_port(),
                                                 endpoint="x")
        assert start_deployment(factory, settings, dep.id, layer_ids=[1, 2], hidden_dir=bad) == "failed"
        with factory() as s:
            d = deployments.get_deployment(s, dep.id)
            assert d.error.startswith("refused: hidden_dir") and "runs root" in d.error and d.pid is None
    with factory() as s:
        dep = deployments.request_deployment(s, kind="verifier", model_path="m", run_id=None, port=free_port(),
                                             endpoint="x")
    assert start_deployment(factory, settings, dep.id, layer_ids=["1; rm -rf /"],
                            hidden_dir=str(settings.runs_root / "r" / "hidden")) == "failed"
    with factory() as s:
        assert "layer_ids must be a list of non-negative integers" in deployments.get_deployment(s, dep.id).error


# ----------------------------------------------------------------- 1, 2, 7: the local mode in a browser


def _local_mode(home: Path, redis_url: str, log_path: Path, gate: StageGate | None = None,
                **extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = worker_env(home, redis_url, **extra)
    if gate is not None:
        env = gate.env(env)
    env.pop("SPEC_BROKER_URL")  # the launcher picks the Redis at --redis-url when it answers
    proc = subprocess.Popen([sys.executable, "-m", "worker.local", "--home", str(home), "--port", str(port),
                             "--redis-url", redis_url], cwd=str(ROOT), env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _children(home: Path) -> dict:
    try:
        return json.loads((home / "local-children.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make test-deps` (or set SPEC_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_dashboard_answers_while_the_tiny_verifier_builds(redis_server, tmp_path):
    """First start with an empty home and an empty verifier cache, building the default
    verifier from its recipe (minutes on 2 cores; the packaged bytes would copy at once):
    the dashboard answers at once and shows the build's latest progress line and elapsed
    time. The build's process is held at its start until the page was seen (a fast machine
    could finish the build before the dashboard is up); then it runs and reports progress
    while the dashboard serves. (Build done -> model and status file:
    tests/test_worker_units.py; the build itself: tests/test_tiny_default.py.)"""
    home = tmp_path / "home"
    gate = StageGate(tmp_path / "gate", "make-tiny-model")
    proc, url = _local_mode(home, redis_server.url, tmp_path / "local.log", gate=gate,
                            SPECULATORS_CACHE=str(tmp_path / "empty-cache"), SPECULATORS_VERIFIER_FROM_RECIPE="1")
    try:
        wait_for(lambda: dashboard_healthy(url) or proc.poll() is not None, 180, what="dashboard health")
        assert proc.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
        wait_for(gate.held, 120, what="the build started (held at its start)")
        status = json.loads((home / "models" / "tiny-llama.build.json").read_text())
        assert status["state"] == "building", status  # the dashboard did not wait for the build
        ARTIFACTS.mkdir(exist_ok=True)
        with _browser() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                page.get_by_text("Building the tiny CPU verifier").wait_for(timeout=60_000)
                text = page.get_by_text("Building the tiny CPU verifier").inner_text()
                assert " elapsed: " in text and "s elapsed" in text, text
                page.screenshot(path=str(ARTIFACTS / "faults-tiny-build.png"))
            finally:
                browser.close()
        # let go, the build reports progress while the dashboard serves
        gate.release()
        log = home / "models" / "tiny-llama.build.log"
        wait_for(lambda: log.is_file() and "step" in log.read_text(), 600, interval=0.5, what="build progress")
        assert dashboard_healthy(url) and proc.poll() is None
    finally:
        gate.release()
        _stop(proc, 60)


def test_children_restart_alone_and_the_run_finishes(redis_server, tiny_llama, tmp_path, spec_home):
    """Local mode: the dashboard is killed while a stage runs (restarted alone; the stage
    goes on, attempts 1: its process is held at its start until the dashboard is back), then
    the worker is killed during training (restarted; the run resumes from its checkpoint).
    The run finishes with no metric row lost or doubled."""
    home = tmp_path / "home"
    shutil.copytree(tiny_llama, home / "models" / "tiny-llama")
    gate = StageGate(tmp_path / "gate", "prepare-data")
    proc, url = _local_mode(home, redis_server.url, tmp_path / "local.log", gate=gate)
    try:
        wait_for(lambda: dashboard_healthy(url) or proc.poll() is not None, 180, what="dashboard health")
        assert proc.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
        settings = spec_home(home, BROKER_URL=redis_server.url)
        factory, run_id = _submit(settings, tiny_llama, epochs=3, max_samples=16)
        pid = wait_for(gate.held, 180, what="prepare running (held at its start)")
        first = _children(home)
        os.kill(first["dashboard"]["pid"], signal.SIGKILL)
        wait_for(lambda: (_children(home).get("dashboard") or {}).get("starts", 0) == 2 and dashboard_healthy(url), 180,
                 what="dashboard restarted")
        assert _children(home)["worker"]["pid"] == first["worker"]["pid"]  # the worker never noticed
        prepare = run_with_stages(factory, run_id)[1]["prepare"]
        assert (prepare.status, prepare.pid) == ("running", pid) and os.path.exists(f"/proc/{pid}")
        gate.release()
        wait_for(lambda: run_with_stages(factory, run_id)[1]["train"].pid, 600, interval=0.5, what="train running")
        os.kill(_children(home)["worker"]["pid"], signal.SIGKILL)
        wait_for(lambda: _finished(factory, run_id), 900, what="run end")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "succeeded", (run.error, (tmp_path / "local.log").read_text()[-3000:])
        assert [by_stage[n].attempts for n in ("prepare", "vocab", "datagen")] == [1, 1, 1]
        assert by_stage["train"].attempts == 2
        assert _children(home)["worker"]["starts"] == 2
        with factory() as s:
            steps = [m.step for m in metrics.step_records(s, run_id, kind="train")]
        assert steps == list(range(1, by_stage["train"].total_steps + 1))  # none lost, none twice
    finally:
        gate.release()
        _stop(proc, 60)
    assert proc.returncode == 0


class _ZeroVllm(BaseHTTPRequestHandler):
    """A served draft that has drafted nothing yet: every counter is 0. It serves the model
    name of the deployment the test records (the page checks it: MODEL)."""

    MODEL = ""

    def do_GET(self):  # noqa: N802
        body = b"" if self.path == "/health" else json.dumps({"data": [{"id": type(self).MODEL}]}).encode() \
            if self.path == "/v1/models" else (
            "# TYPE vllm:spec_decode_num_drafts counter\n"
            'vllm:spec_decode_num_drafts_total{engine="0",model_name="d"} 0.0\n'
            'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="d"} 0.0\n'
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="d"} 0.0\n').encode()
        self.send_response(200 if self.path in ("/health", "/metrics", "/v1/models") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_dashboard_shows_waiting_plain_names_and_no_fake_acceptance(tmp_path, spec_home):
    """In a browser: a run named with Markdown link and image syntax shows as typed (no link,
    no image), a run between stages shows `waiting` with its next stage, and a served draft
    with 0 drafted tokens shows no mean acceptance length."""
    home = tmp_path / "home"
    settings = spec_home(home, BROKER_URL="filesystem://")
    ARTIFACTS.mkdir(exist_ok=True)
    (settings.models_root / "tiny-llama").mkdir(parents=True)
    (settings.models_root / "tiny-llama" / "config.json").write_text("{}")  # no build needed for this test
    name = "[click me](http://evil.example/x) ![img](http://evil.example/i.png) **bold**"
    factory = open_store(settings.db_url)
    with factory() as s:
        runs.create_run(s, run_id="w1", name=name, spec={"mode": "offline", "model": "m"},
                        stages=["prepare", "vocab", "datagen", "train"], work_dir=str(settings.runs_root / "w1"))
        stages.start_stage(s, "w1", "prepare", worker="w", log_path="/dev/null")
        stages.finish_stage(s, "w1", "prepare", "succeeded")
        run = runs.get_run(s, "w1")
        run.error = "an earlier try failed, see http://evil.example/e and www.evil.example"
        s.commit()
        ckpt = settings.runs_root / "w1" / "checkpoints" / "0"
        metrics.ingest_records(s, "w1", [{"type": "checkpoint", "epoch": 0, "step": 1, "path": str(ckpt),
                                          "val_loss": 1.0, "is_best": True, "ts": 1.0}])
    with factory() as s:
        for m in outbox.pending(s):  # keep the worker off this seeded run
            outbox.mark_sent(s, m.id)
    vllm = ThreadingHTTPServer(("127.0.0.1", 0), _ZeroVllm)
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    # filesystem broker (no Redis at port 1); no reconciling: this seeded run must stay waiting
    log = tmp_path / "local.log"
    proc, url = _local_mode(home, "redis://127.0.0.1:1/0", log, SPEC_RECONCILE_EVERY_S="100000")
    try:
        wait_for(lambda: dashboard_healthy(url) or proc.poll() is not None, 180, what="dashboard health")
        # the controller marks servers of an earlier controller stopped at its start: serve after it
        wait_for(lambda: re.search(r"vllm@\S+ ready\.", log.read_text()), 180, what="controller ready")
        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path=str(ckpt), run_id="w1", port=vllm.server_address[1],
                                                 endpoint=f"http://127.0.0.1:{vllm.server_address[1]}")
            deployments.update_deployment(s, dep.id, status="up")
            for m in outbox.pending(s):  # the controller must not start a real server for it
                outbox.mark_sent(s, m.id)
        from worker.serving import served_name

        _ZeroVllm.MODEL = served_name("w1", dep.id)
        with _browser() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1400})
                page.goto(url + "/Run_detail?run=w1")
                page.get_by_role("heading", name=name).wait_for(timeout=60_000)
                page.get_by_text("Status: waiting").wait_for(timeout=30_000)
                assert page.get_by_text("next: vocab").count() >= 1
                page.get_by_text("see http://evil.example/e and www.evil.example").wait_for(timeout=30_000)
                assert page.locator('a[href*="evil.example"]').count() == 0, [page.locator('a[href*="evil.example"]').nth(i).evaluate("e => e.outerHTML.slice(0, 300)") for i in range(page.locator('a[href*="evil.example"]').count())]
                assert page.locator('img[src*="evil.example"]').count() == 0
                page.get_by_text("Mean acceptance length").wait_for(timeout=60_000)
                page.get_by_text("No drafted tokens yet").wait_for(timeout=30_000)
                metric = page.locator('[data-testid="stMetric"]', has_text="Mean acceptance length")
                assert "1.00" not in metric.inner_text() and "n/a" in metric.inner_text()
                page.screenshot(path=str(ARTIFACTS / "faults-run-detail.png"), full_page=True)
                page.goto(url + "/Runs")
                page.locator("td", has_text="waiting").first.wait_for(state="attached", timeout=30_000)
            finally:
                browser.close()
    finally:
        _stop(proc, 60)
        vllm.shutdown()
