"""Runs: create, list, cancel, resume, delete, and the reconciler's question of which runs
wait for a stage that nothing will start (`due_runs`, answered by one SQL query)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, not_, or_, select, update
from sqlalchemy.orm import Session, selectinload

from runstore.errors import NameTaken, StoreError
from runstore.models import (
    ACTIVE_RUN,
    RESUMABLE_RUN,
    RUN_STAGES,
    Checkpoint,
    Deployment,
    Metric,
    OutboxMessage,
    Run,
    Stage,
    StageStatus,
    utcnow,
)
from runstore.stages import STALE_AFTER_S, any_live, cancel_run, live, queue_stages, unfinished


def create_run(session: Session, *, run_id: str, name: str, spec: dict[str, Any],
               stages: list[str], work_dir: str, unique_name: bool = False) -> Run:
    """Insert a run, its stages and the outbox message that starts it, in one transaction.
    `unique_name`: refuse (NameTaken) a name another run has; the dashboard's runs are told
    apart by name, so its form asks for this."""
    if unique_name and session.scalar(select(Run.id).where(Run.name == name).limit(1)) is not None:
        raise NameTaken("another run already has this name: choose a different one")
    run = Run(id=run_id, name=name, spec=spec, work_dir=work_dir, cancel_requested=False)
    run.stages = [Stage(name=s, position=i, status=StageStatus.PENDING, attempts=0) for i, s in enumerate(stages)]
    session.add(run)
    queue_stages(session, run)
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


def _require(session: Session, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise StoreError(f"no run {run_id!r}")
    session.refresh(run)
    return run


def request_cancel(session: Session, run_id: str) -> Run:
    """Flag the run; the worker running its stage kills the process within a second.
    A run with no live stage is cancelled at once."""
    run = _require(session, run_id)
    if run.status not in ACTIVE_RUN:
        raise StoreError(f"run {run_id} is {run.status}; only queued or running runs can be cancelled")
    run.cancel_requested = True
    if not any_live(session, run_id):  # nothing running, or its worker is gone: nobody else will finish the job
        cancel_run(run)
    session.commit()
    return run


def resume_run(session: Session, run_id: str, from_stage: str | None = None) -> list[str]:
    """Requeue a failed, cancelled or interrupted run from `from_stage` (default: its first
    stage that did not succeed). Later stages are reset; training resumes from its last
    checkpoint because the save path is the same. Returns the stages queued."""
    run = _require(session, run_id)
    if run.status not in RESUMABLE_RUN:
        raise StoreError(f"run {run_id} is {run.status}; only failed, cancelled or interrupted runs can be resumed")
    names = [s.name for s in run.stages]
    if from_stage is None:
        from_stage = next(iter(unfinished(run)), None)
        if from_stage is None:
            raise StoreError(f"run {run_id} has no unfinished stage")
    if from_stage not in names:
        raise StoreError(f"run {run_id} has no stage {from_stage!r}")
    todo = names[names.index(from_stage):]
    for s in run.stages:
        if s.name in todo:
            s.status = StageStatus.PENDING
            s.error = None
            s.finished_at = None
    run.error = None
    run.finished_at = None
    run.cancel_requested = False
    queue_stages(session, run, todo)
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


def due_runs(session: Session, *, grace_s: float, stale_after_s: float = STALE_AFTER_S) -> list[tuple[str, str]]:
    """Runs whose next stage should be queued but nothing says it is: queued or running, not
    being cancelled, no live stage, no unsent run_stages message, and no message sent or stage
    finished in the last `grace_s` seconds. Returns (run_id, next stage) pairs.

    One query; the outbox test uses the (run_id, kind, sent_at) index, the stage tests the
    stages' run_id index."""
    now = utcnow()
    recent = now - timedelta(seconds=grace_s)
    of_run = Stage.run_id == Run.id
    next_stage = (select(Stage.name).where(of_run, Stage.status != StageStatus.SUCCEEDED)
                  .order_by(Stage.position).limit(1).correlate(Run).scalar_subquery())
    waiting_message = exists().where(OutboxMessage.run_id == Run.id, OutboxMessage.kind == RUN_STAGES,
                                     or_(OutboxMessage.sent_at.is_(None), OutboxMessage.sent_at > recent))
    q = (select(Run.id, next_stage)
         .where(Run.status.in_(ACTIVE_RUN), Run.cancel_requested.is_(False),
                not_(exists().where(of_run, live(stale_after_s, now))),
                not_(exists().where(of_run, Stage.finished_at.is_not(None), Stage.finished_at > recent)),
                not_(waiting_message), next_stage.is_not(None))
         .order_by(Run.created_at))
    return [(run_id, stage) for run_id, stage in session.execute(q)]


def requeue(session: Session, run_id: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Queue a run's unfinished stages again through the outbox (the reconciler's action).
    A stage left running by a dead worker becomes pending first; a run with a live stage,
    or no longer active, is left alone (returns [])."""
    run = _require(session, run_id)
    if run.status not in ACTIVE_RUN or run.cancel_requested or any_live(session, run_id,
                                                                         stale_after_s=stale_after_s):
        return []
    for s in run.stages:
        if s.status == StageStatus.RUNNING:
            s.status = StageStatus.PENDING
            s.pid = None
    todo = unfinished(run)
    if todo:
        queue_stages(session, run, todo)
    session.commit()
    return todo
