"""Repository functions: every read and change of the run store goes through here.

Each function takes an open `Session` and commits its own change, so a caller in
a worker loop or a Streamlit page never holds a transaction across a slow step.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from runstore.models import Checkpoint, Deployment, Metric, OutboxMessage, Run, Stage, utcnow

ACTIVE_RUN = ("queued", "running")
STALE_AFTER_S = 60.0  # a running stage whose heartbeat is older belongs to a dead worker
RESUMABLE_RUN = ("failed", "cancelled", "interrupted")


class StoreError(Exception):
    """A change the store refuses (e.g. deleting a running run); the message is for the user."""


class NameTaken(StoreError):
    """A new run's name is already another run's."""


# ---------------------------------------------------------------- runs


def create_run(session: Session, *, run_id: str, name: str, spec: dict[str, Any],
               stages: list[str], work_dir: str, unique_name: bool = False) -> Run:
    """Insert a run, its stages and the outbox message that starts it, in one transaction.
    `unique_name`: refuse (NameTaken) a name another run has; the dashboard's runs are told
    apart by name, so its form asks for this."""
    if unique_name and session.scalar(select(Run.id).where(Run.name == name).limit(1)) is not None:
        raise NameTaken("another run already has this name: choose a different one")
    run = Run(id=run_id, name=name, spec=spec, status="queued", work_dir=work_dir,
              cancel_requested=False)
    run.stages = [Stage(name=s, position=i, status="pending", attempts=0) for i, s in enumerate(stages)]
    session.add(run)
    session.add(OutboxMessage(kind="run_stages", payload={"run_id": run_id, "stages": stages}, attempts=0))
    session.commit()
    return run


def run_names(session: Session) -> set[str]:
    return set(session.scalars(select(Run.name)))


def get_run(session: Session, run_id: str) -> Run | None:
    """The run with its stages loaded, current as of now (usable after the session closes)."""
    return session.scalar(select(Run).where(Run.id == run_id).options(selectinload(Run.stages))
                          .execution_options(populate_existing=True))


def list_runs(session: Session) -> list[Run]:
    return list(session.scalars(select(Run).options(selectinload(Run.stages)).order_by(Run.created_at.desc())
                                .execution_options(populate_existing=True)))


def get_stage(session: Session, run_id: str, name: str) -> Stage | None:
    return session.scalar(select(Stage).where(Stage.run_id == run_id, Stage.name == name))


def request_cancel(session: Session, run_id: str) -> Run:
    """Flag the run; the worker running its stage kills the process within a second.
    A run with no stage running is cancelled at once."""
    run = _require(session, run_id)
    if run.status not in ACTIVE_RUN:
        raise StoreError(f"run {run_id} is {run.status}; only queued or running runs can be cancelled")
    run.cancel_requested = True
    stale = utcnow() - timedelta(seconds=STALE_AFTER_S)
    live = [s for s in run.stages if s.status == "running" and (s.heartbeat_at or datetime.min) > stale]
    if not live:  # nothing running, or its worker is gone: nobody else will finish the job
        _mark_cancelled(run)
    session.commit()
    return run


def _mark_cancelled(run: Run) -> None:
    run.status = "cancelled"
    run.finished_at = utcnow()
    for s in run.stages:
        if s.status in ("pending", "queued", "running"):
            s.status = "cancelled"
            s.finished_at = s.finished_at or (utcnow() if s.started_at else None)


def resume_run(session: Session, run_id: str, from_stage: str | None = None) -> list[str]:
    """Requeue a failed, cancelled or interrupted run from `from_stage` (default: its first
    stage that did not succeed). Later stages are reset; training resumes from its last
    checkpoint because the save path is the same. Returns the stages queued."""
    run = _require(session, run_id)
    if run.status not in RESUMABLE_RUN:
        raise StoreError(f"run {run_id} is {run.status}; only failed, cancelled or interrupted runs can be resumed")
    names = [s.name for s in run.stages]
    if from_stage is None:
        from_stage = next((s.name for s in run.stages if s.status != "succeeded"), None)
        if from_stage is None:
            raise StoreError(f"run {run_id} has no unfinished stage")
    if from_stage not in names:
        raise StoreError(f"run {run_id} has no stage {from_stage!r}")
    todo = names[names.index(from_stage):]
    for s in run.stages:
        if s.name in todo:
            s.status = "pending"
            s.error = None
            s.finished_at = None
    run.status = "queued"
    run.error = None
    run.finished_at = None
    run.cancel_requested = False
    session.add(OutboxMessage(kind="run_stages", payload={"run_id": run_id, "stages": todo}, attempts=0))
    session.commit()
    return todo


def delete_run(session: Session, run_id: str) -> str:
    """Delete the run's rows. Files are left alone; the caller removes them only when the user
    asked for it. Returns the work dir so the caller can say where the files are."""
    run = _require(session, run_id)
    if run.status in ACTIVE_RUN:
        raise StoreError(f"run {run_id} is {run.status}; cancel it before deleting")
    work_dir = run.work_dir
    for model in (Metric, Checkpoint):
        session.execute(delete(model).where(model.run_id == run_id))
    session.execute(update(Deployment).where(Deployment.run_id == run_id).values(run_id=None))
    session.delete(run)
    session.commit()
    return work_dir


def _require(session: Session, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise StoreError(f"no run {run_id!r}")
    session.refresh(run)
    return run


# ---------------------------------------------------------------- stages (worker side)


def start_stage(session: Session, run_id: str, name: str, *, worker: str, log_path: str,
                stale_after_s: float = STALE_AFTER_S) -> Stage | None:
    """Claim the stage and mark it running. The claim is one conditional UPDATE, so of two
    workers handed the same stage (a re-queued duplicate) only one wins; the loser gets None.
    A stage running with a fresh heartbeat on another worker cannot be claimed."""
    run = _require(session, run_id)
    now = utcnow()
    free = (Stage.status != "running") | (Stage.worker == worker) | (Stage.heartbeat_at.is_(None)) \
        | (Stage.heartbeat_at < now - timedelta(seconds=stale_after_s))
    res = session.execute(update(Stage).where(Stage.run_id == run_id, Stage.name == name, Stage.status != "succeeded",
                                              free).values(status="running", worker=worker, heartbeat_at=now))
    if res.rowcount != 1:
        session.rollback()
        return None
    stage = get_stage(session, run_id, name)
    assert stage is not None
    session.refresh(stage)
    stage.status = "running"
    stage.attempts += 1
    stage.started_at = now
    stage.finished_at = None
    stage.heartbeat_at = now
    stage.worker = worker
    stage.pid = None
    stage.error = None
    stage.log_path = log_path
    run.status = "running"
    run.current_stage = name
    session.commit()
    return stage


def set_stage_pid(session: Session, stage_id: int, pid: int) -> None:
    session.execute(update(Stage).where(Stage.id == stage_id).values(pid=pid, heartbeat_at=utcnow()))
    session.commit()


def note_stage(session: Session, stage_id: int, note: str) -> None:
    """What a running stage is waiting for (shown in the stage's error column until it ends)."""
    session.execute(update(Stage).where(Stage.id == stage_id, Stage.status == "running").values(error=note[:2000]))
    session.commit()


def stage_progress(session: Session, stage_id: int, done: int, total: int) -> None:
    """A stage's own progress (the `progress` lines of regenerate, prepare, datagen): the same
    columns the trainer's step records fill, so every stage's bar reads them alike."""
    session.execute(update(Stage).where(Stage.id == stage_id, Stage.status == "running")
                    .values(current_step=done, total_steps=total))
    session.commit()


def heartbeat(session: Session, stage_id: int) -> bool:
    """Touch the stage; returns True when the user asked to cancel the run."""
    session.execute(update(Stage).where(Stage.id == stage_id).values(heartbeat_at=utcnow()))
    session.commit()
    stage = session.get(Stage, stage_id)
    session.refresh(stage.run)
    return bool(stage.run.cancel_requested)


def cancel_requested(session: Session, run_id: str) -> bool:
    run = session.get(Run, run_id)
    if run is None:
        return True  # deleted under us
    session.refresh(run)
    return bool(run.cancel_requested)


def finish_stage(session: Session, run_id: str, name: str, status: str, error: str | None = None) -> None:
    """Record a stage's end and what it means for the run."""
    run = _require(session, run_id)
    stage = get_stage(session, run_id, name)
    assert stage is not None
    now = utcnow()
    stage.status = status
    stage.finished_at = now
    stage.pid = None
    stage.error = error
    if status == "succeeded":
        if all(s.status == "succeeded" for s in run.stages):
            run.status = "succeeded"
            run.finished_at = now
            run.current_stage = None
        elif not run.cancel_requested:
            # Queue the next stage in the same transaction: a broker that is down right now
            # leaves the message pending in the outbox, never a run stuck between stages.
            todo = [s.name for s in sorted(run.stages, key=lambda x: x.position) if s.status != "succeeded"]
            run.status = "queued"
            run.current_stage = todo[0]
            session.add(OutboxMessage(kind="run_stages", payload={"run_id": run_id, "stages": todo}, attempts=0))
        else:
            _mark_cancelled(run)
    elif status == "failed":
        run.status = "failed"
        run.error = f"stage {name} failed: {error}" if error else f"stage {name} failed"
        run.finished_at = now
        for s in run.stages:
            if s.status in ("pending", "queued"):
                s.status = "pending"
    elif status == "cancelled":
        _mark_cancelled(run)
    session.commit()


def recover_interrupted(session: Session, *, worker: str, stale_after_s: float) -> list[tuple[str, str]]:
    """Mark stages left `running` by a worker that died as interrupted and their runs
    resumable. A stage counts as orphaned when it belongs to `worker` (restarted under the
    same name) or its heartbeat is older than `stale_after_s`. No process is signalled here:
    a PID in the database may by now belong to anything; the stage's process died with its
    worker (see worker.pdeathsig). Returns (run_id, stage) pairs."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    found: list[tuple[str, str]] = []
    for stage in session.scalars(select(Stage).where(Stage.status == "running")):
        if stage.worker != worker and (stage.heartbeat_at or datetime.min) > cutoff:
            continue
        stage.status = "interrupted"
        stage.finished_at = utcnow()
        stage.pid = None
        stage.error = f"worker {stage.worker} stopped while this stage ran"
        run = stage.run
        if run.cancel_requested:
            _mark_cancelled(run)
        else:
            run.status = "interrupted"
            run.error = stage.error
            found.append((run.id, stage.name))
    session.commit()
    return found


def due_runs(session: Session, *, grace_s: float, stale_after_s: float = STALE_AFTER_S) -> list[tuple[str, str]]:
    """Runs whose next stage should be queued but nothing says it is: queued or running, no
    stage running with a fresh heartbeat, no unsent outbox message, and no message sent or
    stage finished in the last `grace_s` seconds. Returns (run_id, next stage) pairs."""
    now = utcnow()
    recent = now - timedelta(seconds=grace_s)
    stale = now - timedelta(seconds=stale_after_s)
    out: list[tuple[str, str]] = []
    runs = session.scalars(select(Run).where(Run.status.in_(ACTIVE_RUN), Run.cancel_requested.is_(False))
                           .options(selectinload(Run.stages)).execution_options(populate_existing=True))
    for run in runs:
        stages = sorted(run.stages, key=lambda x: x.position)
        if any(s.status == "running" and (s.heartbeat_at or datetime.min) > stale for s in stages):
            continue
        if any(s.finished_at and s.finished_at > recent for s in stages):
            continue
        todo = [s.name for s in stages if s.status != "succeeded"]
        if not todo:
            continue
        msgs = [m for m in session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "run_stages"))
                if (m.payload or {}).get("run_id") == run.id]
        if any(m.sent_at is None for m in msgs) or any(m.sent_at > recent for m in msgs if m.sent_at):
            continue
        out.append((run.id, todo[0]))
    return out


def requeue(session: Session, run_id: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Queue a run's unfinished stages again through the outbox (the reconciler's action).
    A stage left `running` by a dead worker becomes pending first; a run with a live stage,
    or no longer active, is left alone (returns [])."""
    run = _require(session, run_id)
    stale = utcnow() - timedelta(seconds=stale_after_s)
    if run.status not in ACTIVE_RUN or run.cancel_requested or any(
            s.status == "running" and (s.heartbeat_at or datetime.min) > stale for s in run.stages):
        return []
    todo = [s.name for s in sorted(run.stages, key=lambda x: x.position) if s.status != "succeeded"]
    for s in run.stages:
        if s.status == "running":
            s.status = "pending"
            s.pid = None
    if todo:
        run.status = "queued"
        run.current_stage = todo[0]
        session.add(OutboxMessage(kind="run_stages", payload={"run_id": run_id, "stages": todo}, attempts=0))
    session.commit()
    return todo


# ---------------------------------------------------------------- metrics


def ingest_records(session: Session, run_id: str, records: Iterable[dict[str, Any]],
                   stage_id: int | None = None) -> int:
    """Store trainer metrics records. `train`/`val` rows upsert on (run, type, step) so a
    re-read or a resumed trainer that re-emits a step never duplicates it, and the row
    holds the newest values. Returns how many metric rows were written."""
    written = 0
    for rec in records:
        kind = rec.get("type")
        if kind in ("train", "val") and isinstance(rec.get("step"), int):
            values = dict(rec.get("metrics") or {})
            stmt = sqlite_insert(Metric).values(run_id=run_id, type=kind, step=rec["step"],
                                                epoch=rec.get("epoch"), ts=float(rec.get("ts", 0.0)),
                                                values=values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "type", "step"],
                set_={"epoch": stmt.excluded.epoch, "ts": stmt.excluded.ts, "values": stmt.excluded["values"]},
            )
            session.execute(stmt)
            written += 1
            if kind == "train" and stage_id is not None:
                vals: dict[str, Any] = {"current_step": rec["step"]}
                if isinstance(rec.get("total_steps"), int):
                    vals["total_steps"] = rec["total_steps"]
                session.execute(update(Stage).where(Stage.id == stage_id).values(**vals))
        elif kind == "checkpoint" and isinstance(rec.get("epoch"), int):
            if rec.get("is_best"):
                session.execute(update(Checkpoint).where(Checkpoint.run_id == run_id).values(is_best=False))
            stmt = sqlite_insert(Checkpoint).values(run_id=run_id, epoch=rec["epoch"], step=int(rec.get("step", 0)),
                                                    path=str(rec.get("path", "")), val_loss=rec.get("val_loss"),
                                                    is_best=bool(rec.get("is_best")), ts=float(rec.get("ts", 0.0)))
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "epoch"],
                set_={k: stmt.excluded[k] for k in ("step", "path", "val_loss", "is_best", "ts")},
            )
            session.execute(stmt)
        elif kind == "start" and stage_id is not None and isinstance(rec.get("total_steps"), int):
            session.execute(update(Stage).where(Stage.id == stage_id).values(total_steps=rec["total_steps"]))
    session.commit()
    return written


def metrics(session: Session, run_id: str, kind: str | None = None) -> list[Metric]:
    q = select(Metric).where(Metric.run_id == run_id)
    if kind:
        q = q.where(Metric.type == kind)
    return list(session.scalars(q.order_by(Metric.type, Metric.step)))


def metrics_after(session: Session, run_id: str, after: dict[str, int]) -> list[Any]:
    """The `train` and `val` rows (type, step, epoch, ts, values; plain rows, not tracked
    objects) past the step already seen of each type (`after`, default none seen): a page
    refreshing its charts reads only what is new, through the (run, type, step) index."""
    out: list[Any] = []
    for kind in ("train", "val"):
        q = select(Metric.type, Metric.step, Metric.epoch, Metric.ts, Metric.values).where(
            Metric.run_id == run_id, Metric.type == kind, Metric.step > after.get(kind, -1)).order_by(Metric.step)
        out += session.execute(q).all()
    return out


def checkpoints(session: Session, run_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.epoch)))


def best_checkpoint(session: Session, run_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.is_best.is_(True)))


# ---------------------------------------------------------------- deployments


def request_deployment(session: Session, *, kind: str, model_path: str, run_id: str | None,
                       port: int, endpoint: str, extra: dict[str, Any] | None = None) -> Deployment:
    """Record a server to start and queue the controller task in the same transaction."""
    dep = Deployment(kind=kind, model_path=model_path, run_id=run_id, status="requested", port=port,
                     endpoint=endpoint)
    session.add(dep)
    session.flush()
    session.add(OutboxMessage(kind="serve", payload={"deployment_id": dep.id, **(extra or {})}, attempts=0))
    session.commit()
    return dep


def request_stop(session: Session, deployment_id: int) -> None:
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise StoreError(f"no deployment {deployment_id}")
    dep.status = "stopping"
    session.add(OutboxMessage(kind="stop_deployment", payload={"deployment_id": deployment_id}, attempts=0))
    session.commit()


def update_deployment(session: Session, deployment_id: int, **values: Any) -> None:
    session.execute(update(Deployment).where(Deployment.id == deployment_id).values(**values, updated_at=utcnow()))
    session.commit()


def get_deployment(session: Session, deployment_id: int) -> Deployment | None:
    dep = session.get(Deployment, deployment_id)
    if dep is not None:
        session.refresh(dep)
    return dep


def latest_deployment(session: Session, run_id: str, kind: str = "draft") -> Deployment | None:
    return session.scalar(select(Deployment).where(Deployment.run_id == run_id, Deployment.kind == kind)
                          .order_by(Deployment.id.desc()).limit(1))


def live_deployments(session: Session, kind: str | None = None) -> list[Deployment]:
    q = select(Deployment).where(Deployment.status.in_(("requested", "starting", "up")))
    if kind:
        q = q.where(Deployment.kind == kind)
    return list(session.scalars(q))


def stopping_deployments(session: Session) -> list[Deployment]:
    return list(session.scalars(select(Deployment).where(Deployment.status == "stopping")))


# ---------------------------------------------------------------- outbox


def pending_outbox(session: Session, limit: int = 50) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
                                .order_by(OutboxMessage.id).limit(limit)))


def claim_outbox(session: Session, message_id: int, lease_s: float = 30.0) -> bool:
    """Claim a message for sending; two dispatchers never send the same one at once."""
    now = utcnow()
    res = session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message_id, OutboxMessage.sent_at.is_(None),
               (OutboxMessage.claimed_at.is_(None)) | (OutboxMessage.claimed_at < now - timedelta(seconds=lease_s)))
        .values(claimed_at=now, attempts=OutboxMessage.attempts + 1)
    )
    session.commit()
    return res.rowcount == 1


def outbox_sent(session: Session, message_id: int) -> None:
    session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(sent_at=utcnow()))
    session.commit()


def outbox_failed(session: Session, message_id: int, error: str) -> None:
    session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id)
                    .values(claimed_at=None, last_error=error[:2000]))
    session.commit()
