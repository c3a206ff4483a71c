"""The reconciler: queue again every run whose next stage is due but that nothing will run.

A run can be left waiting with no message anywhere: Redis restarted without its data, a
message lost in transit, a worker gone for good with its stage marked running. The outbox
covers a broker that is down when a stage ends (see runstore.stages.finish_stage); this pass
covers the rest. It is idempotent: it acts only when the run has no live stage, no unsent or
recently sent message, and the broker's stage queue is empty, and a stage handed out twice
is run once (the claim in runstore.stages.start_stage, the skip of succeeded stages).
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from runstore import runs, stages
from worker.celery_app import GPU_QUEUE, gpu_queue

log = logging.getLogger(__name__)

# a message sent or a stage finished more recently than this is still on its way
GRACE_S = float(os.environ.get("SPEC_RECONCILE_GRACE_S", "30"))


def queue_size(app: Celery, queue: str = GPU_QUEUE, timeout: float = 2.0) -> int | None:
    """Messages waiting in `queue` (0 when it does not exist yet); None when the broker does
    not answer, so the caller does nothing rather than guess."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            channel = conn.default_channel
            size = getattr(channel, "_size", None)
            if size is not None:
                # kombu's virtual transports (Redis, filesystem) count the list directly; their
                # passive queue_declare misses keys under a global_keyprefix (kombu 5.7 checks
                # EXISTS without the prefix) and would report a full queue as missing
                return int(size(queue))
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
            except Exception as exc:  # a queue nobody declared yet holds nothing
                if "404" in str(exc) or "NOT_FOUND" in str(exc).upper():
                    return 0
                raise
            return int(count)
    except Exception as exc:
        log.info("reconciler: queue %s not readable: %s", queue, exc)
        return None


def reconcile(factory: sessionmaker[Session], app: Celery, *, grace_s: float = GRACE_S) -> list[str]:
    """One pass; returns the ids of the runs queued again (their messages go through the outbox)."""
    with factory() as s:
        due = runs.due_runs(s, grace_s=grace_s)
    if not due:
        return []
    sizes: dict[str, int | None] = {}
    done = []
    for run_id, stage in due:
        with factory() as s:
            run = runs.get_run(s, run_id)
            queue = gpu_queue(stages.requested_gpus(run)) if run is not None else GPU_QUEUE
        if queue not in sizes:
            sizes[queue] = queue_size(app, queue)
        if sizes[queue] is None or sizes[queue] > 0:
            continue  # the broker is down, or a message for the run may still be queued there
        with factory() as s:
            if runs.requeue(s, run_id):
                log.warning("run %s: next stage %s was due but not queued; queued again", run_id, stage)
                done.append(run_id)
    return done
