"""A training run's metrics stream in the store: `ingest_records` keeps the typed records of
`metrics.jsonl` (speculators.metric_records), `step_records` and `acceptance_records` give the
dashboard the same typed records back (`score_records`: the val and acceptance records of many
runs at once), and the checkpoints the trainer announced (epoch ends in `checkpoints`, mid-epoch
ones kept as metric rows of type `step_ckpt` and read by `step_checkpoints`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from runstore.models import Checkpoint, Metric, Stage

#: The `Metric.type` a mid-epoch checkpoint (StepCheckpointRecord) is kept under (the column holds 10 characters).
STEP_CHECKPOINT = "step_ckpt"
from speculators.metric_records import (
    STEP_METRIC_TYPES,
    AcceptanceRecord,
    CheckpointRecord,
    StartRecord,
    StepCheckpointRecord,
    TrainRecord,
    ValRecord,
    parse_record,
)


def ingest_records(session: Session, run_id: str, records: Iterable[Any], stage_id: int | None = None) -> int:
    """Store the decoded JSON objects of a trainer's metrics.jsonl; what `parse_record` does
    not recognise is skipped. Train, val and acceptance records upsert on (run, type, step)
    (an acceptance record's fields past epoch and step are the row's `values`), so a re-read
    or a resumed trainer that re-emits a step never duplicates it and the row holds the newest
    values; train and start records also set the stage's step counters. Returns how many
    metric rows were written."""
    written = 0
    insert = _upsert_insert(session)
    for rec in map(parse_record, records):
        if isinstance(rec, (TrainRecord, ValRecord, AcceptanceRecord)):
            total = rec.total_steps if isinstance(rec, TrainRecord) else None
            values = _acceptance_values(rec) if isinstance(rec, AcceptanceRecord) else dict(rec.metrics)
            stmt = insert(Metric).values(run_id=run_id, type=rec.TYPE, step=rec.step, epoch=rec.epoch,
                                                ts=rec.ts, total_steps=total, values=values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "type", "step"],
                set_={k: stmt.excluded[k] for k in ("epoch", "ts", "total_steps", "values")},
            )
            session.execute(stmt)
            written += 1
            if isinstance(rec, TrainRecord) and stage_id is not None:
                session.execute(update(Stage).where(Stage.id == stage_id)
                                .values(current_step=rec.step, total_steps=rec.total_steps))
        elif isinstance(rec, CheckpointRecord):
            if rec.is_best:
                session.execute(update(Checkpoint).where(Checkpoint.run_id == run_id).values(is_best=False))
            stmt = insert(Checkpoint).values(run_id=run_id, epoch=rec.epoch, step=rec.step, path=rec.path,
                                                    val_loss=rec.val_loss, is_best=rec.is_best, ts=rec.ts)
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "epoch"],
                set_={k: stmt.excluded[k] for k in ("step", "path", "val_loss", "is_best", "ts")},
            )
            session.execute(stmt)
        elif isinstance(rec, StepCheckpointRecord):  # a metric row keyed by its step: (run, epoch) holds the epoch's
            stmt = sqlite_insert(Metric).values(run_id=run_id, type=STEP_CHECKPOINT, step=rec.step, epoch=rec.epoch,
                                                ts=rec.ts, values={"path": rec.path, "reason": rec.reason})
            stmt = stmt.on_conflict_do_update(index_elements=["run_id", "type", "step"],
                                              set_={k: stmt.excluded[k] for k in ("epoch", "ts", "values")})
            session.execute(stmt)
        elif isinstance(rec, StartRecord) and stage_id is not None:
            session.execute(update(Stage).where(Stage.id == stage_id).values(total_steps=rec.total_steps))
    session.commit()
    return written


def _upsert_insert(session: Session):
    """The INSERT with ON CONFLICT of the session's database (SQLite and PostgreSQL spell the
    upsert alike); the unique (run, type, step) key makes a concurrent duplicate an update."""
    return postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def step_records(session: Session, run_id: str, after: dict[str, int] | None = None,
                 kind: str | None = None) -> list[TrainRecord | ValRecord]:
    """The run's train and val records, each type by step, past the step already seen of each
    type (`after`, default none seen; `kind`: one type only): a page refreshing its charts
    reads only what is new, through the (run, type, step) index."""
    after = after or {}
    out: list[TrainRecord | ValRecord] = []
    for typ in STEP_METRIC_TYPES if kind is None else (kind,):
        q = select(Metric.type, Metric.ts, Metric.epoch, Metric.step, Metric.total_steps, Metric.values).where(
            Metric.run_id == run_id, Metric.type == typ, Metric.step > after.get(typ, -1)).order_by(Metric.step)
        for row in session.execute(q).mappings():
            rec = parse_record({**row, "metrics": row["values"]})
            if isinstance(rec, (TrainRecord, ValRecord)):
                out.append(rec)
    return out


def _acceptance_values(rec: AcceptanceRecord) -> dict[str, Any]:
    out = rec.to_dict()
    for key in ("type", "ts", "epoch", "step"):
        del out[key]
    return out


def acceptance_records(session: Session, run_id: str) -> list[AcceptanceRecord]:
    """The run's acceptance records by step (a few per epoch: read whole on each refresh)."""
    q = select(Metric.ts, Metric.epoch, Metric.step, Metric.values).where(
        Metric.run_id == run_id, Metric.type == AcceptanceRecord.TYPE).order_by(Metric.step)
    out = []
    for row in session.execute(q).mappings():
        rec = parse_record({**row["values"], "type": AcceptanceRecord.TYPE, "ts": row["ts"], "epoch": row["epoch"],
                            "step": row["step"]})
        if isinstance(rec, AcceptanceRecord):
            out.append(rec)
    return out


def step_checkpoints(session: Session, run_id: str) -> list[StepCheckpointRecord]:
    """The run's mid-epoch checkpoints (`--checkpoint-every-steps`, `--max-steps`, a signal) by step."""
    q = select(Metric.ts, Metric.epoch, Metric.step, Metric.values).where(
        Metric.run_id == run_id, Metric.type == STEP_CHECKPOINT).order_by(Metric.step)
    out = []
    for row in session.execute(q).mappings():
        rec = parse_record({**row["values"], "type": StepCheckpointRecord.TYPE, "ts": row["ts"],
                            "epoch": row["epoch"], "step": row["step"]})
        if isinstance(rec, StepCheckpointRecord):
            out.append(rec)
    return out


def score_records(session: Session, run_ids: Iterable[str]) -> dict[str, tuple[list[ValRecord], list[AcceptanceRecord]]]:
    """Each run's val and acceptance records (a few per epoch), in two queries for all the runs:
    what the runs table's best validation loss and best acceptance come from."""
    ids = list(run_ids)
    out: dict[str, tuple[list[ValRecord], list[AcceptanceRecord]]] = {r: ([], []) for r in ids}
    if not ids:
        return out
    q = select(Metric.run_id, Metric.type, Metric.ts, Metric.epoch, Metric.step, Metric.values).where(
        Metric.run_id.in_(ids), Metric.type.in_((ValRecord.TYPE, AcceptanceRecord.TYPE))).order_by(Metric.step)
    for row in session.execute(q).mappings():
        if row["type"] == ValRecord.TYPE:
            rec = parse_record({"type": row["type"], "ts": row["ts"], "epoch": row["epoch"], "step": row["step"],
                                "metrics": row["values"]})
            if isinstance(rec, ValRecord):
                out[row["run_id"]][0].append(rec)
        else:
            rec = parse_record({**row["values"], "type": row["type"], "ts": row["ts"], "epoch": row["epoch"],
                                "step": row["step"]})
            if isinstance(rec, AcceptanceRecord):
                out[row["run_id"]][1].append(rec)
    return out


def checkpoints(session: Session, run_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.epoch)))


def best_checkpoint(session: Session, run_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.is_best.is_(True)))
