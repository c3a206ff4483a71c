"""A run's stages on the worker side: claim, heartbeat, progress, finish, recovery.

Two rules live here once: when a running stage counts as alive (`live`: its worker's
heartbeat is fresh), and how a run's unfinished stages are queued (`queue_stages`: the run
turns `queued` and one outbox message in the caller's transaction names the stages to run).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, not_, or_, select, update
from sqlalchemy.orm import Session

from runstore import outbox
from runstore.models import RUN_STAGES, Run, RunStatus, Stage, StageStatus, utcnow

STALE_AFTER_S = 60.0  # a running stage whose heartbeat is older belongs to a dead worker


def live(stale_after_s: float = STALE_AFTER_S, now: datetime | None = None) -> ColumnElement[bool]:
    """SQL condition: the stage runs and its worker beat within `stale_after_s` seconds. A
    missing heartbeat counts as stale; the condition is never NULL, so `not_(live())` is
    exactly "not alive"."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_s)
    return and_(Stage.status == StageStatus.RUNNING, Stage.heartbeat_at.is_not(None), Stage.heartbeat_at > cutoff)


def any_live(session: Session, run_id: str, *, stage_id: int | None = None,
             stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a stage of the run (or the stage `stage_id`) is alive by `live`."""
    cond = [Stage.run_id == run_id, live(stale_after_s)]
    if stage_id is not None:
        cond.append(Stage.id == stage_id)
    return bool(session.scalar(select(exists().where(*cond))))


def unfinished(run: Run) -> list[str]:
    """The run's stages that have not succeeded, in pipeline order."""
    return [s.name for s in sorted(run.stages, key=lambda x: x.position) if s.status != StageStatus.SUCCEEDED]


def requested_gpus(run: Run) -> int:
    """How many GPUs the run asks for (its settings' `gpus`; 0: the CPU): the broker queue
    of its stages follows it (worker.celery_app.gpu_queue)."""
    try:
        return max(int((run.spec or {}).get("gpus") or 0), 0)
    except (TypeError, ValueError):
        return 0


def requested_nodes(run: Run) -> int:
    """How many nodes (workers) the run's train stage asks for (its settings' `nodes`; 1 by
    default): that many messages are sent for the train stage (worker.dispatch)."""
    try:
        return max(int((run.spec or {}).get("nodes") or 1), 1)
    except (TypeError, ValueError):
        return 1


def queue_stages(session: Session, run: Run, todo: list[str] | None = None) -> list[str]:
    """Mark the run queued and add the outbox message that runs `todo` (default: its
    unfinished stages), in the caller's transaction: a broker that is down leaves the message
    pending, never a run stuck between stages. Returns the stages queued."""
    todo = unfinished(run) if todo is None else todo
    run.status = RunStatus.QUEUED
    run.current_stage = todo[0] if todo else None
    outbox.add(session, RUN_STAGES, {"run_id": run.id, "stages": todo, "gpus": requested_gpus(run),
                                     "nodes": requested_nodes(run)})
    return todo


def cancel_run(run: Run) -> None:
    """Mark the run and every stage not yet ended cancelled (the caller commits)."""
    now = utcnow()
    run.status = RunStatus.CANCELLED
    run.finished_at = now
    for s in run.stages:
        if s.status in (StageStatus.PENDING, StageStatus.QUEUED, StageStatus.RUNNING):
            s.status = StageStatus.CANCELLED
            s.finished_at = s.finished_at or (now if s.started_at else None)


def get_stage(session: Session, run_id: str, name: str) -> Stage | None:
    return session.scalar(select(Stage).where(Stage.run_id == run_id, Stage.name == name))


def start_stage(session: Session, run_id: str, name: str, *, worker: str, log_path: str,
                stale_after_s: float = STALE_AFTER_S, host: str | None = None) -> Stage | None:
    """Claim the stage and mark it running on `worker` (at `host`: the machine, shown by the
    dashboard). The claim is one conditional UPDATE, so of two workers handed the same stage
    (a re-queued duplicate) only one wins, on SQLite and on PostgreSQL alike (there the
    loser's UPDATE waits for the winner's commit and re-reads the row); the loser gets None.
    A stage alive on another worker cannot be claimed."""
    now = utcnow()
    free = or_(not_(live(stale_after_s, now)), Stage.worker == worker)
    res = session.execute(update(Stage).where(Stage.run_id == run_id, Stage.name == name,
                                              Stage.status != StageStatus.SUCCEEDED, free)
                          .values(status=StageStatus.RUNNING, worker=worker, host=host, heartbeat_at=now))
    if res.rowcount != 1:
        session.rollback()
        return None
    stage = get_stage(session, run_id, name)
    assert stage is not None
    session.refresh(stage)
    session.refresh(stage.run)
    stage.status = StageStatus.RUNNING
    stage.attempts += 1
    stage.started_at = now
    stage.finished_at = None
    stage.heartbeat_at = now
    stage.worker = worker
    stage.host = host
    stage.pid = None
    stage.error = None
    stage.log_path = log_path
    stage.run.status = RunStatus.RUNNING
    stage.run.current_stage = name
    session.commit()
    return stage


def set_stage_pid(session: Session, stage_id: int, pid: int) -> None:
    session.execute(update(Stage).where(Stage.id == stage_id).values(pid=pid, heartbeat_at=utcnow()))
    session.commit()


def note_stage(session: Session, stage_id: int, note: str) -> None:
    """What a running stage is waiting for (shown in the stage's error column until it ends)."""
    session.execute(update(Stage).where(Stage.id == stage_id, Stage.status == StageStatus.RUNNING)
                    .values(error=note[:2000]))
    session.commit()


def stage_progress(session: Session, stage_id: int, done: int, total: int) -> None:
    """A stage's own progress (the `progress` records of regenerate, prepare, datagen): the
    same columns the trainer's step records fill, so every stage's bar reads them alike."""
    session.execute(update(Stage).where(Stage.id == stage_id, Stage.status == StageStatus.RUNNING)
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


def finish_stage(session: Session, run_id: str, name: str, status: StageStatus, error: str | None = None) -> None:
    """Record a stage's end and what it means for the run: the next stages queued after a
    success, the run failed or cancelled with it otherwise."""
    stage = get_stage(session, run_id, name)
    if stage is None:
        raise LookupError(f"run {run_id!r} has no stage {name!r}")
    session.refresh(stage)
    run = stage.run
    session.refresh(run)
    now = utcnow()
    stage.status = status
    stage.finished_at = now
    stage.pid = None
    stage.error = error
    if status == StageStatus.SUCCEEDED:
        if not unfinished(run):
            run.status = RunStatus.SUCCEEDED
            run.finished_at = now
            run.current_stage = None
        elif not run.cancel_requested:
            queue_stages(session, run)
        else:
            cancel_run(run)
    elif status == StageStatus.FAILED:
        run.status = RunStatus.FAILED
        run.error = f"stage {name} failed: {error}" if error else f"stage {name} failed"
        run.finished_at = now
        for s in run.stages:
            if s.status in (StageStatus.PENDING, StageStatus.QUEUED):
                s.status = StageStatus.PENDING
    elif status == StageStatus.CANCELLED:
        cancel_run(run)
    session.commit()


def recover_interrupted(session: Session, *, worker: str,
                        stale_after_s: float = STALE_AFTER_S) -> list[tuple[str, str]]:
    """Mark stages left running by a worker that died as interrupted and their runs
    resumable. A stage counts as orphaned when it belongs to `worker` (restarted under the
    same name) or is not `live`. No process is signalled here: a PID in the database may by
    now belong to anything; the stage's process died with its worker (the command lifeline of speculators.process).
    Returns (run_id, stage) pairs."""
    found: list[tuple[str, str]] = []
    orphaned = select(Stage).where(Stage.status == StageStatus.RUNNING,
                                   or_(Stage.worker == worker, not_(live(stale_after_s))))
    for stage in session.scalars(orphaned):
        stage.status = StageStatus.INTERRUPTED
        stage.finished_at = utcnow()
        stage.pid = None
        stage.error = f"worker {stage.worker} stopped while this stage ran"
        run = stage.run
        if run.cancel_requested:
            cancel_run(run)
        else:
            run.status = RunStatus.INTERRUPTED
            run.error = stage.error
            found.append((run.id, stage.name))
    session.commit()
    return found
