"""Run-store helpers the worker and fault tests share: a run stored as the dashboard's form
stores it (the run, its stages and its start message), then sent to the broker."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from runstore import open_store, runs
from runstore.settings import Settings
from speculators.config.run import RunSettings
from speculators.config.stages import pipeline_stages
from worker.celery_app import make_celery
from worker.dispatch import flush_outbox


def local_model(settings: Settings, model: Path) -> Path:
    """A copy of `model` under the models root (the form accepts local models there only)."""
    local = settings.models_root / "tiny"
    if not local.exists():
        shutil.copytree(model, local)
    return local


def submit_run(settings: Settings, spec: RunSettings, *, send: bool = True):
    """Store a run of `spec` with its start message and, unless `send` is False, send that
    message to the broker. Returns (session factory, run id)."""
    factory = open_store(settings.db_url)
    run_id = uuid.uuid4().hex[:12]
    with factory() as s:
        runs.create_run(s, run_id=run_id, name=spec.name, spec=spec.to_dict(), stages=pipeline_stages(spec),
                        work_dir=str(settings.runs_root / run_id))
    if send:
        assert flush_outbox(factory, make_celery(settings)) == (1, None)
    return factory, run_id
