"""SQLAlchemy 2.x models. The Alembic migrations in runstore/migrations build the same schema."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# The statuses are str-valued enums: a member equals (and is stored as) the same string the
# database has always held, so old rows read back unchanged and no migration is needed.


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class StageStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class DeploymentStatus(StrEnum):
    REQUESTED = "requested"
    STARTING = "starting"
    UP = "up"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE_RUN = (RunStatus.QUEUED, RunStatus.RUNNING)
RESUMABLE_RUN = (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED)
LIVE_DEPLOYMENT = (DeploymentStatus.REQUESTED, DeploymentStatus.STARTING, DeploymentStatus.UP)

#: The outbox message that asks a worker to run a run's stages (payload: run_id, stages).
RUN_STAGES = "run_stages"


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.QUEUED, index=True)  # a RunStatus
    current_stage: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    work_dir: Mapped[str] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    stages: Mapped[list[Stage]] = relationship(
        back_populates="run", order_by="Stage.position", cascade="all, delete-orphan"
    )


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_stage_run_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(40))
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=StageStatus.PENDING)  # a StageStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)  # the machine the worker runs on
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    current_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)

    run: Mapped[Run] = relationship(back_populates="stages")


class StageNode(Base):
    """One node (machine) of a multi-node stage's attempt: rank 0 is the worker that claimed the
    stage and hosts torchrun's rendezvous at `address`; ranks 1.. are claimed by the other
    workers handed the stage (a conditional UPDATE of a row whose worker is NULL)."""

    __tablename__ = "stage_nodes"
    __table_args__ = (UniqueConstraint("stage_id", "attempt", "node_rank", name="uq_stage_node_rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    node_rank: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="free")  # free | joined | running | ended | failed
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    address: Mapped[str | None] = mapped_column(String(300), nullable=True)  # rank 0: the rendezvous host:port
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Metric(Base):
    """One `train`, `val` or `acceptance` record of the trainer's metrics.jsonl
    (speculators.metric_records); unique per (run, type, step). `values` holds the record's
    `metrics` (an acceptance record: its fields past epoch and step)."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "type", "step", name="uq_metric_run_type_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(10))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ts: Mapped[float] = mapped_column(Float)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)  # train records only
    values: Mapped[dict[str, Any]] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "epoch", name="uq_checkpoint_run_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    ts: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """A vLLM server the controller runs: a run's best checkpoint, or the verifier for online training."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(20))  # draft | verifier
    model_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default=DeploymentStatus.REQUESTED)  # a DeploymentStatus
    endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    acceptance: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_health_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class OutboxMessage(Base):
    """A task to send to the broker. Written in the same transaction as the change that needs
    it, so a broker that is down loses nothing: the dispatcher sends it when Redis is back."""

    __tablename__ = "outbox"
    # the reconciler's question "is a run_stages message for this run unsent or recent?"
    __table_args__ = (Index("ix_outbox_run_kind_sent", "run_id", "kind", "sent_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(40))  # run_stages | serve | stop_deployment
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # the run a run_stages message is for (also in the payload); a column so SQL can find it
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
