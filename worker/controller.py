"""The vLLM controller: a Celery worker on the `vllm` queue inside the vLLM container.

It starts `speculators serve CHECKPOINT` (a run's checkpoint_best) or
`speculators launch-vllm MODEL` (the verifier for online training) as a child
process, waits for `/health`, records the state in the run store, and stops the
server on request. One server per kind: starting a new draft server stops the
previous one, since they share the GPU and the port.
"""

from __future__ import annotations

import os
import time

from sqlalchemy.orm import Session, sessionmaker

from runstore import open_store, repo
from runstore.models import utcnow
from runstore.settings import Settings
from worker import procs
from worker.celery_app import app
from worker.pipeline import serve_argv, verifier_argv
from worker.runner import healthy

START_TIMEOUT_S = float(os.environ.get("SPEC_VLLM_START_TIMEOUT", "1200"))


def _alive(pid: int | None) -> bool:
    return bool(pid) and procs.group_alive(pid)


def start_deployment(factory: sessionmaker[Session], settings: Settings, deployment_id: int,
                     layer_ids: list[int] | None = None, hidden_dir: str | None = None,
                     argv: list[str] | None = None) -> str:
    with factory() as s:
        dep = repo.get_deployment(s, deployment_id)
        if dep is None or dep.status not in ("requested",):
            return dep.status if dep else "missing"
        for other in repo.live_deployments(s, kind=dep.kind):
            if other.id != dep.id and other.port == dep.port:
                procs.stop_group(None, pid=other.pid) if _alive(other.pid) else None
                repo.update_deployment(s, other.id, status="stopped", pid=None,
                                       error=f"replaced by deployment {dep.id}")
        kind, model, port = dep.kind, dep.model_path, dep.port or settings.vllm_port
    if argv is None:
        if kind == "draft":
            argv = serve_argv(model, port)
        else:
            argv = verifier_argv(model, layer_ids or [], port, hidden_dir or str(settings.home / "hidden_states"))
    log_path = settings.home / "deployments" / f"{deployment_id}.log"
    try:
        proc = procs.start(argv, log_path=log_path, cwd=settings.home, env=procs.child_env(os.cpu_count() or 1))
    except OSError as exc:
        with factory() as s:
            repo.update_deployment(s, deployment_id, status="failed", error=f"could not start: {exc}")
        return "failed"
    local_url = f"http://127.0.0.1:{port}"
    with factory() as s:
        repo.update_deployment(s, deployment_id, status="starting", pid=proc.pid, log_path=str(log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
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
                procs.stop_group(proc)
                repo.update_deployment(s, deployment_id, status="stopped", pid=None)
                return "stopped"
        time.sleep(1.0)
    procs.stop_group(proc)
    with factory() as s:
        repo.update_deployment(s, deployment_id, status="failed", pid=None,
                               error=f"/health did not answer within {START_TIMEOUT_S:.0f} s")
    return "failed"


def stop_deployment(factory: sessionmaker[Session], deployment_id: int) -> str:
    with factory() as s:
        dep = repo.get_deployment(s, deployment_id)
        if dep is None:
            return "missing"
        if _alive(dep.pid):
            procs.stop_group(None, pid=dep.pid)
        repo.update_deployment(s, deployment_id, status="stopped", pid=None)
    return "stopped"


def recover_deployments(factory: sessionmaker[Session]) -> None:
    """After a controller restart, servers it started are gone with it: say so."""
    with factory() as s:
        for dep in repo.live_deployments(s):
            if dep.status == "requested":
                continue  # its start message is still queued
            if not _alive(dep.pid):
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
