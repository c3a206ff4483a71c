"""The vLLM controller: a Celery worker on the `vllm` queue inside the vLLM container.

It starts `speculators serve CHECKPOINT` (a run's checkpoint_best) or
`speculators launch-vllm MODEL` (the verifier for online training) as a child
process, waits for `/health`, records the state in the run store, and stops the
server on request. One server per kind: starting a new draft server stops the
previous one, since they share the GPU and the port.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from runstore import open_store, repo
from runstore.models import utcnow
from runstore.settings import Settings
from worker import procs
from worker.celery_app import app
from worker.pipeline import serve_argv, verifier_argv
from worker.runner import healthy
from worker.spec import inside

START_TIMEOUT_S = float(os.environ.get("SPEC_VLLM_START_TIMEOUT", "1200"))

# The servers this controller process started, by deployment id. Stopping goes through these
# handles only: a PID in the database may belong to another controller or, after a restart,
# to an unrelated process. A server whose controller died was killed with it (pdeathsig).
_SERVERS: dict[int, subprocess.Popen] = {}


def _stop_own(deployment_id: int) -> bool:
    """Stop a server this process started; False when it holds no such server."""
    proc = _SERVERS.pop(deployment_id, None)
    if proc is None:
        return False
    procs.stop_group(proc)
    return True


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


def start_deployment(factory: sessionmaker[Session], settings: Settings, deployment_id: int,
                     layer_ids: list[int] | None = None, hidden_dir: str | None = None,
                     argv: list[str] | None = None) -> str:
    with factory() as s:
        dep = repo.get_deployment(s, deployment_id)
        if dep is None or dep.status not in ("requested",):
            return dep.status if dep else "missing"
        for other in repo.live_deployments(s, kind=dep.kind):
            if other.id != dep.id and other.port == dep.port:
                _stop_own(other.id)
                repo.update_deployment(s, other.id, status="stopped", pid=None,
                                       error=f"replaced by deployment {dep.id}")
        kind, model, port = dep.kind, dep.model_path, dep.port or settings.vllm_port
    host = settings.vllm_bind or "127.0.0.1"
    env = procs.child_env(os.cpu_count() or 1)
    if argv is None:
        try:
            if kind == "draft":
                argv = serve_argv(model, port, host=host)
            else:
                argv = verifier_argv(model, checked_layer_ids(layer_ids), port,
                                     checked_hidden_dir(settings, hidden_dir), host=host)
        except BadRequest as exc:
            with factory() as s:
                repo.update_deployment(s, deployment_id, status="failed", error=f"refused: {exc}")
            return "failed"
    if kind == "draft" and settings.vllm_api_key:
        env["VLLM_API_KEY"] = settings.vllm_api_key  # via the environment: not in `ps` or the log
    log_path = settings.home / "deployments" / f"{deployment_id}.log"
    try:
        proc = procs.start(argv, log_path=log_path, cwd=settings.home, env=env)
    except OSError as exc:
        with factory() as s:
            repo.update_deployment(s, deployment_id, status="failed", error=f"could not start: {exc}")
        return "failed"
    _SERVERS[deployment_id] = proc
    local_url = f"http://127.0.0.1:{port}"
    with factory() as s:
        repo.update_deployment(s, deployment_id, status="starting", pid=proc.pid, log_path=str(log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _SERVERS.pop(deployment_id, None)
            with factory() as s:
                repo.update_deployment(s, deployment_id, status="failed", pid=None,
                                       error=procs.error_summary(log_path, proc.returncode))
            return "failed"
        if healthy(local_url):
            with factory() as s:
                repo.update_deployment(s, deployment_id, status="up", last_health_at=utcnow())
            return "up"
        with factory() as s:
            if repo.get_deployment(s, deployment_id).status == "stopping":
                _stop_own(deployment_id)
                repo.update_deployment(s, deployment_id, status="stopped", pid=None)
                return "stopped"
        time.sleep(1.0)
    _stop_own(deployment_id)
    with factory() as s:
        repo.update_deployment(s, deployment_id, status="failed", pid=None,
                               error=f"/health did not answer within {START_TIMEOUT_S:.0f} s")
    return "failed"


def stop_deployment(factory: sessionmaker[Session], deployment_id: int) -> str:
    with factory() as s:
        dep = repo.get_deployment(s, deployment_id)
        if dep is None:
            return "missing"
        _stop_own(deployment_id)  # none held: it died with the controller that started it
        repo.update_deployment(s, deployment_id, status="stopped", pid=None)
    return "stopped"


def recover_deployments(factory: sessionmaker[Session]) -> None:
    """After a controller restart, servers it started are gone with it: say so."""
    with factory() as s:
        for dep in repo.live_deployments(s):
            if dep.status == "requested":
                continue  # its start message is still queued
            if dep.id not in _SERVERS:  # started by an earlier controller process: gone with it
                repo.update_deployment(s, dep.id, status="stopped", pid=None,
                                       error="the vLLM controller restarted; serve again")


def _store():
    settings = Settings.from_env()
    settings.ensure_dirs()
    return settings, open_store(settings.db_url)


@app.task(name="worker.controller.start_server")
def start_server(deployment_id: int, layer_ids: list[int] | None = None, hidden_dir: str | None = None) -> str:
    settings, factory = _store()
    return start_deployment(factory, settings, deployment_id, layer_ids=layer_ids, hidden_dir=hidden_dir)


@app.task(name="worker.controller.stop_server")
def stop_server(deployment_id: int) -> str:
    _, factory = _store()
    return stop_deployment(factory, deployment_id)
