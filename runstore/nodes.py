"""The nodes of a multi-node stage: who runs which node rank, where node 0's rendezvous is,
and whether each node is still there.

The worker that claims the stage (`stages.start_stage`) is node 0: it writes one row per node
rank for the attempt (`open_nodes`), its own filled in. Every other worker handed the stage
claims a free rank with one conditional UPDATE (`claim_node`: of two workers after the same
rank one wins, on SQLite and PostgreSQL alike, as with stage claims; a worker repeating its
claim gets the rank it holds). Node 0 publishes the
rendezvous address (`publish`), each node beats (`beat`), ends (`end_node`), and node 0 reads
the others (`nodes_of`) to see who is missing.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from runstore.models import StageNode, utcnow

FREE, JOINED, RUNNING, ENDED, FAILED = "free", "joined", "running", "ended", "failed"


def open_nodes(session: Session, stage_id: int, attempt: int, nnodes: int, *, worker: str,
               host: str | None) -> StageNode:
    """Node 0's row (this worker) and free rows for ranks 1..nnodes-1 of the attempt.
    Idempotent for the same worker: a call repeated after its reply was lost to a database
    restart returns the row the first one wrote."""
    held = node(session, stage_id, attempt, 0)
    if held is not None and held.worker == worker:
        return held
    now = utcnow()
    session.add(StageNode(stage_id=stage_id, attempt=attempt, node_rank=0, status=JOINED, worker=worker,
                          host=host, heartbeat_at=now))
    for rank in range(1, nnodes):
        session.add(StageNode(stage_id=stage_id, attempt=attempt, node_rank=rank, status=FREE))
    session.commit()
    return node(session, stage_id, attempt, 0)


def node(session: Session, stage_id: int, attempt: int, rank: int) -> StageNode | None:
    row = session.scalar(select(StageNode).where(StageNode.stage_id == stage_id, StageNode.attempt == attempt,
                                                 StageNode.node_rank == rank))
    if row is not None:
        session.refresh(row)
    return row


def nodes_of(session: Session, stage_id: int, attempt: int) -> list[StageNode]:
    rows = list(session.scalars(select(StageNode).where(StageNode.stage_id == stage_id,
                                                        StageNode.attempt == attempt)
                                .order_by(StageNode.node_rank)))
    for row in rows:
        session.refresh(row)
    return rows


def claim_node(session: Session, stage_id: int, attempt: int, *, worker: str, host: str | None) -> int | None:
    """Take the lowest free node rank of the attempt for `worker`; its rank, or None when every
    rank is taken (or node 0 has not opened the attempt). One conditional UPDATE per rank.
    Idempotent per worker and attempt: a rank this worker already claimed and has not started
    (a claim repeated after its reply was lost to a database restart) is returned again, never
    a second one; a worker whose node of the attempt already ran or ended gets None."""
    held = session.execute(select(StageNode.node_rank, StageNode.status).where(
        StageNode.stage_id == stage_id, StageNode.attempt == attempt, StageNode.worker == worker)
        .order_by(StageNode.node_rank)).first()
    if held is not None:
        return held.node_rank if held.status == JOINED else None
    ranks = session.scalars(select(StageNode.node_rank).where(
        StageNode.stage_id == stage_id, StageNode.attempt == attempt, StageNode.status == FREE)
        .order_by(StageNode.node_rank)).all()
    for rank in ranks:
        res = session.execute(update(StageNode).where(
            StageNode.stage_id == stage_id, StageNode.attempt == attempt, StageNode.node_rank == rank,
            StageNode.status == FREE, StageNode.worker.is_(None))
            .values(status=JOINED, worker=worker, host=host, heartbeat_at=utcnow()))
        session.commit()
        if res.rowcount == 1:
            return rank
    return None


def publish(session: Session, node_id: int, address: str) -> None:
    """Node 0's rendezvous endpoint (host:port): the other nodes start their trainers now."""
    session.execute(update(StageNode).where(StageNode.id == node_id)
                    .values(address=address, status=RUNNING, heartbeat_at=utcnow()))
    session.commit()


def beat(session: Session, node_id: int, status: str | None = None) -> None:
    values = {"heartbeat_at": utcnow()}
    if status is not None:
        values["status"] = status
    session.execute(update(StageNode).where(StageNode.id == node_id).values(**values))
    session.commit()


def end_node(session: Session, node_id: int, status: str, error: str | None = None) -> None:
    session.execute(update(StageNode).where(StageNode.id == node_id)
                    .values(status=status, error=(error or None) and error[:2000], heartbeat_at=utcnow()))
    session.commit()


def is_stale(row: StageNode, stale_after_s: float) -> bool:
    """A claimed node whose worker has not beaten within `stale_after_s` seconds."""
    return row.heartbeat_at is None or row.heartbeat_at < utcnow() - timedelta(seconds=stale_after_s)


def describe(row: StageNode) -> str:
    """`node 1 (worker gpu0@b on host b)`: how messages name a node."""
    where = f"worker {row.worker}" + (f" on host {row.host}" if row.host else "") if row.worker else "no worker"
    return f"node {row.node_rank} ({where})"
