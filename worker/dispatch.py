"""Send the SQLite outbox to the broker.

Submitting a run writes the run and an outbox message in one transaction; this
module turns pending messages into Celery tasks. When Redis is down the
message stays pending (nothing is lost) and a later flush - the dashboard's
background dispatcher retries every few seconds - queues it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from urllib.parse import urlparse

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from runstore import outbox
from runstore.models import RUN_STAGES
from worker.celery_app import VLLM_QUEUE, gpu_queue

log = logging.getLogger(__name__)


def _send(app: Celery, kind: str, payload: dict) -> None:
    if kind == RUN_STAGES:
        # One task for the first stage: when it succeeds, the worker writes the message for the
        # next one into the outbox in the same transaction (runstore.stages.finish_stage).
        # The train stage of an N-node run: N tasks on the same queue, the first leads (claims
        # the stage as node 0), the others join it (worker.multinode).
        stage, queue = payload["stages"][0], gpu_queue(int(payload.get("gpus") or 0))
        copies = max(int(payload.get("nodes") or 1), 1) if stage == "train" else 1
        for i in range(copies):
            app.send_task("worker.tasks.run_stage", args=(payload["run_id"], stage),
                          kwargs={"join": True} if i else {}, queue=queue, retry=False, ignore_result=True)
    elif kind == "serve":
        app.send_task("worker.controller.start_server", args=(payload["deployment_id"],),
                      kwargs={"layer_ids": payload.get("layer_ids") or [], "hidden_dir": payload.get("hidden_dir"),
                              "kv_cache_gib": payload.get("kv_cache_gib")},
                      queue=VLLM_QUEUE, retry=False, ignore_result=True)
    elif kind == "stop_deployment":
        app.send_task("worker.controller.stop_server", args=(payload["deployment_id"],), queue=VLLM_QUEUE,
                      retry=False, ignore_result=True)
    else:
        raise ValueError(f"unknown outbox message kind {kind!r}")


def probe_broker(url: str, timeout: float = 1.0) -> str | None:
    """A plain TCP connect to a Redis broker: a dead one is reported in milliseconds instead
    of after the client's reconnect back-off. Returns the error, or None."""
    if not url.startswith(("redis://", "rediss://")):
        return None
    u = urlparse(url)
    host, port = u.hostname or "localhost", u.port or 6379
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"cannot connect to Redis at {host}:{port}: {exc.strerror or exc}"


def flush_outbox(factory: sessionmaker[Session], app: Celery) -> tuple[int, str | None]:
    """Send what is pending, oldest first. Returns (sent, error); stops at the first broker
    error since the rest would fail the same way."""
    sent = 0
    with factory() as s:
        pending = [(m.id, m.kind, m.payload) for m in outbox.pending(s)]
    if not pending:
        return 0, None
    down = probe_broker(app.conf.broker_url)
    if down:
        with factory() as s:
            for mid, _, _ in pending:
                outbox.mark_failed(s, mid, down)
        return 0, down
    for mid, kind, payload in pending:
        with factory() as s:
            if not outbox.claim(s, mid):
                continue
        try:
            _send(app, kind, payload)
        except Exception as exc:  # kombu raises several types for a dead broker
            err = f"{type(exc).__name__}: {exc}"
            with factory() as s:
                outbox.mark_failed(s, mid, err)
            log.warning("broker unreachable, %d message(s) kept in the outbox: %s", len(pending) - sent, err)
            return sent, err
        with factory() as s:
            outbox.mark_sent(s, mid)
        sent += 1
    return sent, None


def broker_reachable(app: Celery, timeout: float = 2.0) -> bool:
    if probe_broker(app.conf.broker_url, timeout):
        return False
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False


class Dispatcher(threading.Thread):
    """Background thread that flushes the outbox every `interval_s` seconds and, every
    `reconcile_every_s` (None: never), queues again runs whose next stage is due."""

    def __init__(self, factory: sessionmaker[Session], app: Celery, interval_s: float = 3.0,
                 reconcile_every_s: float | None = None) -> None:
        super().__init__(name="outbox-dispatcher", daemon=True)
        self.factory, self.app, self.interval_s = factory, app, interval_s
        self.reconcile_every_s = reconcile_every_s
        self.last_error: str | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        from worker.reconcile import reconcile

        last_reconcile = time.monotonic()
        while not self._stop.is_set():
            try:
                _, self.last_error = flush_outbox(self.factory, self.app)
                if self.reconcile_every_s is not None and time.monotonic() - last_reconcile >= self.reconcile_every_s:
                    last_reconcile = time.monotonic()
                    if reconcile(self.factory, self.app):
                        _, self.last_error = flush_outbox(self.factory, self.app)
            except Exception as exc:  # keep the thread alive through a locked DB or similar
                self.last_error = str(exc)
                log.exception("outbox flush failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
