"""The broker outbox: tasks to send, written in the same transaction as the change that needs
them (so a broker that is down loses nothing), sent by `worker.dispatch`, and pruned a while
after delivery so the table holds only what is pending or recent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from runstore.models import RUN_STAGES, OutboxMessage, utcnow

# Sent messages are kept this long: the reconciler reads "sent in the last grace period"
# (30 s by default), and an hour of history is enough to read what went out after a fault.
KEEP_SENT_S = 3600.0


def add(session: Session, kind: str, payload: dict[str, Any]) -> None:
    """Stage a message in the caller's transaction (the caller commits)."""
    run_id = payload.get("run_id") if kind == RUN_STAGES else None
    session.add(OutboxMessage(kind=kind, payload=payload, run_id=run_id, attempts=0))


def pending(session: Session, limit: int = 50) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
                                .order_by(OutboxMessage.id).limit(limit)))


def claim(session: Session, message_id: int, lease_s: float = 30.0) -> bool:
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


def mark_sent(session: Session, message_id: int, keep_s: float = KEEP_SENT_S) -> None:
    """Record a delivery and, in the same write, drop messages delivered over `keep_s` ago."""
    now = utcnow()
    session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(sent_at=now))
    session.execute(delete(OutboxMessage).where(OutboxMessage.sent_at < now - timedelta(seconds=keep_s)))
    session.commit()


def mark_failed(session: Session, message_id: int, error: str) -> None:
    session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id)
                    .values(claimed_at=None, last_error=error[:2000]))
    session.commit()
