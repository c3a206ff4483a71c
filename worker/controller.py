"""The vLLM controller: a Celery worker on the `vllm` queue inside the vLLM container.

It starts `speculators serve CHECKPOINT` (a run's checkpoint_best) or
`speculators launch-vllm MODEL` (the verifier for online training) as a child
process group, waits until that server answers, records the state in the run store, watches
it while it runs, and stops it on request. One server per port: starting a new draft
server stops the previous one, since they share the GPU and the port.

What the run store says is what is true:
- "up" only while the process this controller started runs AND it or one of its
  descendants holds the port's listening socket (a port answered by an older server or another program is
  reported, never taken for ours);
- "stopped" only once the port is closed;
- a server never outlives its controller: it runs under a group lifeline
  (`speculators.process`) that kills its whole process group when the controller
  dies, even by SIGKILL; and a restarted controller stops any server an earlier one left,
  recognised by the record written at its start (pid, process start time, boot id), never
  by a bare PID from the database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from runstore import deployments
from runstore.db import wait_for_store
from runstore.models import utcnow
from runstore.settings import Settings
from speculators import process
from worker import procs, serving
from worker.celery_app import app
from worker.pipeline import serve_argv, verifier_argv
from worker.runner import healthy
from worker.spec import inside

log = logging.getLogger(__name__)
START_TIMEOUT_S = float(os.environ.get("SPEC_VLLM_START_TIMEOUT", "1200"))
# SIGTERM, then SIGKILL after this; vLLM needs a few seconds to shut its engine down
STOP_GRACE_S = float(os.environ.get("SPEC_VLLM_STOP_GRACE_S", "20"))
PORT_CLOSE_TIMEOUT_S = 30.0
MONITOR_EVERY_S = float(os.environ.get("SPEC_VLLM_MONITOR_S", "5"))

# The servers this controller process started, by deployment id. A server started by an
# earlier controller process is reached only through its record (serving.ServerRecord).
_SERVERS: dict[int, process.Process] = {}
_LOCK = threading.RLock()


def _settings() -> Settings:
    return Settings.from_env()


def _probe_host(settings: Settings) -> str:
    bind = settings.vllm_bind or "127.0.0.1"
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def _stop_server_of(settings: Settings, deployment_id: int) -> str | None:
    """Stop the server of a deployment: through this process's handle, else through the
    record of an earlier controller process when that process group still runs. Returns
    what was stopped, or None when nothing of it runs."""
    with _LOCK:
        proc = _SERVERS.pop(deployment_id, None)
    if proc is not None:
        proc.stop(grace_s=STOP_GRACE_S)
        return f"pid {proc.pid}"
    rec = serving.read_record(settings.home, deployment_id)
    if rec is not None and serving.record_alive(rec):
        process.stop_group(rec.pgid, grace_s=STOP_GRACE_S)
        return f"pid {rec.pid}, left by an earlier controller process"
    return None


class BadRequest(ValueError):
    """A broker message this controller refuses (its text ends up in the deployment's error)."""


def checked_hidden_dir(settings: Settings, hidden_dir: str | None) -> str:
    """Where the verifier may write hidden states: inside the runs root only. The path comes
    from a broker message, which anyone who can reach Redis can write."""
    if not hidden_dir:
        return str(settings.runs_root / "_verifier" / "hidden_states")
    p = Path(hidden_dir)
    if not p.is_absolute() or ".." in p.parts or not inside(p, settings.runs_root):
        raise BadRequest(f"hidden_dir {hidden_dir!r} is not inside the runs root {settings.runs_root}")
    return str(p)


def checked_layer_ids(layer_ids) -> list[int]:
    if layer_ids is None:
        return []
    if not isinstance(layer_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 4096
                                                    for i in layer_ids):
        raise BadRequest(f"layer_ids must be a list of non-negative integers, got {layer_ids!r}")
    return list(layer_ids)


def checked_kv_cache_gib(value) -> int | None:
    """The dashboard's KV cache field (GiB, 0 or None = automatic), from a broker message."""
    if value in (None, 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise BadRequest(f"kv_cache_gib must be a whole number of GiB between 1 and 1024, got {value!r}")
    return value


def _ours_answers(proc: process.Process, port: int, url: str, served: str | None, api_key: str | None) -> bool:
    """Our process runs, /health answers, and the listening socket is held by it or one of
    its descendants (where /proc cannot tell: /v1/models lists the name only this
    deployment serves)."""
    if proc.poll() is not None or not healthy(url):
        return False
    mine = serving.tree_listens_on(proc.pid, port)
    if mine is None:
        return serving.check_endpoint(url, served, api_key).healthy
    return mine


def _fail(factory, deployment_id: int, error: str) -> str:
    with factory() as s:
        deployments.update_deployment(s, deployment_id, status="failed", pid=None, error=error)
    return "failed"


def start_deployment(factory: sessionmaker[Session], settings: Settings, deployment_id: int,
                     layer_ids: list[int] | None = None, hidden_dir: str | None = None,
                     argv: list[str] | None = None, kv_cache_gib: int | None = None) -> str:
    with factory() as s:
        dep = deployments.get_deployment(s, deployment_id)
        if dep is None or dep.status not in ("requested",):
            return dep.status if dep else "missing"
        others = [(o.id, o.port) for o in deployments.live_deployments(s, kind=dep.kind) if o.id != dep.id]
        kind, model, port, run_id = dep.kind, dep.model_path, dep.port or settings.vllm_port, dep.run_id
    probe_host = _probe_host(settings)
    for other_id, other_port in others:
        if other_port == port:
            _stop_server_of(settings, other_id)
            with factory() as s:
                deployments.update_deployment(s, other_id, status="stopped", pid=None,
                                              error=f"replaced by deployment {deployment_id}")
    if not serving.wait_port_closed(port, PORT_CLOSE_TIMEOUT_S if others else 0.0, probe_host):
        return _fail(factory, deployment_id,
                     f"port {port} is already in use by {serving.describe_holders(port)}, which this "
                     "controller did not start; stop that process, or serve on another port (SPEC_VLLM_PORT)")
    host = settings.vllm_bind or "127.0.0.1"
    env = procs.child_env(os.cpu_count() or 1)
    served = serving.served_name(run_id, deployment_id) if kind == "draft" else None
    api_key = settings.vllm_api_key if kind == "draft" and settings.vllm_api_key else None
    try:
        kv = checked_kv_cache_gib(kv_cache_gib) or (settings.vllm_kv_cache_gib or None)
        if argv is None:
            if kind == "draft":
                argv = serve_argv(model, port, host=host, served_name=served, kv_cache_gib=kv)
            else:
                argv = verifier_argv(model, checked_layer_ids(layer_ids), port,
                                     checked_hidden_dir(settings, hidden_dir), host=host)
    except BadRequest as exc:
        return _fail(factory, deployment_id, f"refused: {exc}")
    if api_key:
        env["VLLM_API_KEY"] = api_key  # via the environment: not in `ps` or the log
    log_path = settings.home / "deployments" / f"{deployment_id}.log"
    try:
        proc = process.start(argv, log=log_path, cwd=settings.home, env=env, lifeline=process.Lifeline.GROUP)
    except OSError as exc:
        return _fail(factory, deployment_id, f"could not start: {exc}")
    with _LOCK:
        _SERVERS[deployment_id] = proc
    serving.write_record(settings.home, serving.ServerRecord(
        deployment_id=deployment_id, pid=proc.pid, pgid=proc.pid, port=port, start_ticks=serving.start_time(proc.pid),
        boot_id=serving.boot_id(), host=socket.gethostname(), served_model=served,
        api_key_required=bool(api_key), kv_cache=f"{kv} GiB" if kv else "automatic"))
    local_url = f"http://{probe_host}:{port}"
    with factory() as s:
        deployments.update_deployment(s, deployment_id, status="starting", pid=proc.pid, log_path=str(log_path), error=None)

    def up_or_stopping() -> str | None:
        if _ours_answers(proc, port, local_url, served, api_key):
            return "up"
        with factory() as s:
            return "stopping" if deployments.get_deployment(s, deployment_id).status == "stopping" else None

    try:
        outcome = proc.wait_ready(up_or_stopping, START_TIMEOUT_S, poll_s=1.0)
    except process.ExitedEarly as exc:
        with _LOCK:
            _SERVERS.pop(deployment_id, None)
        return _fail(factory, deployment_id, procs.error_summary(log_path, exc.returncode, cause_first=True))
    except process.TimedOut:
        _stop_server_of(settings, deployment_id)
        return _fail(factory, deployment_id, f"/health did not answer within {START_TIMEOUT_S:.0f} s")
    if outcome == "stopping":
        return _finish_stop(factory, settings, deployment_id, port)
    with factory() as s:
        deployments.update_deployment(s, deployment_id, status="up", last_health_at=utcnow())
    return "up"


def _finish_stop(factory, settings: Settings, deployment_id: int, port: int | None) -> str:
    """Stop the deployment's server and say "stopped" only once its port is closed."""
    _stop_server_of(settings, deployment_id)
    if port and not serving.wait_port_closed(port, PORT_CLOSE_TIMEOUT_S, _probe_host(settings)):
        with factory() as s:
            deployments.update_deployment(s, deployment_id, status="stopped", pid=None,
                                          error=f"stopped; port {port} is still answered by "
                                                f"{serving.describe_holders(port)}, which this controller did not start")
        return "stopped"
    with factory() as s:
        deployments.update_deployment(s, deployment_id, status="stopped", pid=None)
    return "stopped"


def stop_deployment(factory: sessionmaker[Session], deployment_id: int, settings: Settings | None = None) -> str:
    """Stop through the handle this process holds, or an earlier controller process's record;
    never by the PID column alone (it may name a reused PID)."""
    settings = settings or _settings()
    with factory() as s:
        dep = deployments.get_deployment(s, deployment_id)
        if dep is None:
            return "missing"
        port = dep.port
    return _finish_stop(factory, settings, deployment_id, port)


def recover_deployments(factory: sessionmaker[Session], settings: Settings | None = None) -> None:
    """At controller start: a server of an earlier controller process that still runs (its
    lifeline could not take it along) is stopped; the deployment is marked stopped, with why."""
    settings = settings or _settings()
    with factory() as s:
        found = [(d.id, d.port, d.status) for d in deployments.live_deployments(s)]
        found += [(d.id, d.port, d.status) for d in deployments.stopping_deployments(s)]
    for dep_id, port, status in found:
        if status == "requested" or dep_id in _SERVERS:
            continue  # its start message is still queued / it is ours
        what = _stop_server_of(settings, dep_id)
        if port and not serving.wait_port_closed(port, PORT_CLOSE_TIMEOUT_S if what else 0.0, _probe_host(settings)):
            error = (f"the vLLM controller restarted; port {port} is answered by {serving.describe_holders(port)}, "
                     "which this controller did not start; serve again once it is free")
        elif what:
            error = f"the vLLM controller restarted and stopped the server it found running ({what}); serve again"
        else:
            error = "the vLLM controller restarted; the server had stopped with it; serve again"
        with factory() as s:
            deployments.update_deployment(s, dep_id, status="stopped", pid=None, error=error)
    for port in {settings.vllm_port, settings.verifier_port}:
        if serving.port_open(port, _probe_host(settings)):
            log.warning("port %s is held by %s, which this controller did not start", port,
                        serving.describe_holders(port))


def check_servers(factory: sessionmaker[Session], settings: Settings) -> None:
    """One pass of the watch on running servers: one that exited is marked failed with the
    cause from its log; one that stops answering, or whose port another process took, gets
    that as its error (cleared when it answers again)."""
    with _LOCK:
        for dep_id, proc in list(_SERVERS.items()):
            with factory() as s:
                dep = deployments.get_deployment(s, dep_id)
                if dep is None or dep.status != "up":
                    continue
                port, log_path = dep.port, dep.log_path
            rec = serving.read_record(settings.home, dep_id)
            served = rec.served_model if rec else None
            url = f"http://{_probe_host(settings)}:{port}"
            if proc.poll() is not None:
                _SERVERS.pop(dep_id, None)
                _fail(factory, dep_id, procs.error_summary(log_path, proc.returncode, cause_first=True))
                continue
            if _ours_answers(proc, port, url, served, settings.vllm_api_key or None):
                with factory() as s:
                    deployments.update_deployment(s, dep_id, last_health_at=utcnow(), error=None)
                continue
            why = (f"its process runs but port {port} is held by {serving.describe_holders(port)}"
                   if serving.tree_listens_on(proc.pid, port) is False and serving.port_open(port, _probe_host(settings))
                   else "not answering /health")
            with factory() as s:
                deployments.update_deployment(s, dep_id, error=why)


def start_monitor(factory: sessionmaker[Session], settings: Settings) -> threading.Thread:
    def loop() -> None:
        while True:
            time.sleep(MONITOR_EVERY_S)
            try:
                check_servers(factory, settings)
            except Exception:  # the watch must outlive a locked database or a flaky probe
                log.exception("checking the vLLM servers failed")

    thread = threading.Thread(target=loop, name="vllm-monitor", daemon=True)
    thread.start()
    return thread


def _store():
    settings = Settings.from_env()
    settings.ensure_dirs()
    return settings, wait_for_store(settings.db_url)  # waits while the database is unreachable


@app.task(name="worker.controller.start_server")
def start_server(deployment_id: int, layer_ids: list[int] | None = None, hidden_dir: str | None = None,
                 kv_cache_gib: int | None = None) -> str:
    settings, factory = _store()
    return start_deployment(factory, settings, deployment_id, layer_ids=layer_ids, hidden_dir=hidden_dir,
                            kv_cache_gib=kv_cache_gib)


@app.task(name="worker.controller.stop_server")
def stop_server(deployment_id: int) -> str:
    settings, factory = _store()
    return stop_deployment(factory, deployment_id, settings)
