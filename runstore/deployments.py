"""vLLM servers the controller runs (a run's best checkpoint, or a verifier for online
training): requested here with their outbox task, updated by the controller."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from runstore import outbox
from runstore.errors import StoreError
from runstore.models import LIVE_DEPLOYMENT, Deployment, DeploymentStatus, utcnow


def request_deployment(session: Session, *, kind: str, model_path: str, run_id: str | None,
                       port: int, endpoint: str, extra: dict[str, Any] | None = None) -> Deployment:
    """Record a server to start and queue the controller task in the same transaction."""
    dep = Deployment(kind=kind, model_path=model_path, run_id=run_id, status=DeploymentStatus.REQUESTED, port=port,
                     endpoint=endpoint)
    session.add(dep)
    session.flush()
    outbox.add(session, "serve", {"deployment_id": dep.id, **(extra or {})})
    session.commit()
    return dep


def request_stop(session: Session, deployment_id: int) -> None:
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise StoreError(f"no deployment {deployment_id}")
    dep.status = DeploymentStatus.STOPPING
    outbox.add(session, "stop_deployment", {"deployment_id": deployment_id})
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
    q = select(Deployment).where(Deployment.status.in_(LIVE_DEPLOYMENT))
    if kind:
        q = q.where(Deployment.kind == kind)
    return list(session.scalars(q))


def stopping_deployments(session: Session) -> list[Deployment]:
    return list(session.scalars(select(Deployment).where(Deployment.status == DeploymentStatus.STOPPING)))
