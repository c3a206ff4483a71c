"""Stage tasks (GPU queue) and the recovery a worker does when it starts."""

from __future__ import annotations

import logging
import os

from celery.exceptions import Ignore
from celery.signals import worker_ready

from runstore import runs, stages
from runstore.db import wait_for_store
from runstore.settings import Settings
from worker.celery_app import GPU_QUEUE, VLLM_QUEUE, app
from worker.dispatch import Dispatcher, flush_outbox
from worker import multinode
from worker.health import start_beating
from worker.runner import execute_stage

log = logging.getLogger(__name__)
RECONCILE_EVERY_S = float(os.environ.get("SPEC_RECONCILE_EVERY_S", "15"))


class StageFailed(Exception):
    """Raised so Celery stops the chain; the stage's error is in the run store."""


def _store():
    """Settings and the run store; waits (logging, with backoff) while the database is
    unreachable, so a task received then runs when it answers instead of being lost."""
    settings = Settings.from_env()
    settings.ensure_dirs()
    return settings, wait_for_store(settings.db_url)


@app.task(bind=True, name="worker.tasks.run_stage")
def run_stage(self, run_id: str, stage: str, join: bool = False) -> str:
    """Run a stage; `join`: one of the further nodes of a multi-node train stage (worker.multinode)."""
    settings, factory = _store()
    if join:
        multinode.join(factory, settings, run_id, worker=self.request.hostname or "worker")
        raise Ignore()  # node 0 records the stage's end and queues what follows
    result = execute_stage(factory, settings, run_id, stage, worker=self.request.hostname or "worker",
                           dispatch=lambda: flush_outbox(factory, app))
    if result in ("succeeded", "skipped"):
        # A success queued the next stage in the outbox; send it now. A broker that is down
        # leaves it pending and the dispatcher thread sends it when the broker is back.
        flush_outbox(factory, app)
        return result
    if result == "failed":
        raise StageFailed(f"run {run_id}: stage {stage} failed")
    # cancelled, a duplicate of a stage running elsewhere, or a message for a run that has
    # ended (delivered again after a broker restart): end the chain quietly
    raise Ignore()


@worker_ready.connect
def _recover(sender=None, **_kwargs) -> None:
    """A worker killed mid-stage left its stage `running`. At restart mark it interrupted and,
    with SPEC_AUTO_RESUME on (default), queue the run again from that stage; training then
    resumes from its last checkpoint. The GPU worker then keeps an outbox dispatcher and the
    reconciler (worker.reconcile) running in a thread, and a liveness file fresh for the
    healthcheck (worker.health)."""
    try:
        queues = {q.name for q in sender.task_consumer.queues}
    except AttributeError:
        queues = {GPU_QUEUE}
    # beat first: a worker waiting for an unreachable database is alive, not hung
    start_beating(Settings.from_env().home, getattr(sender, "hostname", None) or "worker")
    settings, factory = _store()
    if VLLM_QUEUE in queues:
        from worker.controller import recover_deployments, start_monitor

        recover_deployments(factory, settings)
        start_monitor(factory, settings)
    if GPU_QUEUE not in queues:
        return
    # The GPU worker also sends the outbox, so a run submitted while Redis was down is queued
    # when Redis returns even if no dashboard page is open.
    Dispatcher(factory, app, interval_s=5.0, reconcile_every_s=RECONCILE_EVERY_S).start()
    with factory() as s:
        found = stages.recover_interrupted(s, worker=sender.hostname)
    for run_id, stage in found:
        log.warning("run %s: stage %s was interrupted by a worker restart", run_id, stage)
        if settings.auto_resume:
            with factory() as s:
                runs.resume_run(s, run_id, from_stage=stage)
    if found:
        flush_outbox(factory, app)
