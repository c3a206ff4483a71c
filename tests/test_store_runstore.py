"""Run store: migrations keep old runs, WAL mode, metric de-duplication, outbox, recovery."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from runstore import deployments, errors, metrics, outbox, runs, stages
from runstore.db import current_revision, make_engine, open_store, upgrade_database
from runstore.models import Base, Stage, utcnow
from speculators.metric_records import TrainRecord, ValRecord

HEAD = "0003"


@pytest.fixture()
def factory(tmp_path):
    return open_store(f"sqlite:///{tmp_path / 'runs.sqlite'}")


def _run(factory, run_id="r1", stages=("prepare", "vocab", "datagen", "train")):
    with factory() as s:
        return runs.create_run(s, run_id=run_id, name="demo", spec={"mode": "offline"}, stages=list(stages),
                               work_dir=f"/tmp/{run_id}")


def test_upgrade_from_first_revision_keeps_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    upgrade_database(url, "0001")
    con = sqlite3.connect(tmp_path / "old.sqlite")
    con.execute("INSERT INTO runs (id, name, spec, status, work_dir, cancel_requested, created_at, updated_at) "
                "VALUES ('old1', 'before upgrade', '{\"mode\": \"offline\"}', 'succeeded', '/w', 0, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    con.execute("INSERT INTO metrics (run_id, type, step, epoch, ts, \"values\") "
                "VALUES ('old1', 'train', 1, 0, 1.0, '{\"loss\": 2.5}')")
    con.commit()
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert "deployments" not in tables and "outbox" not in tables

    upgrade_database(url)  # what open_store does at startup
    engine = make_engine(url)
    assert current_revision(engine) == HEAD
    factory = open_store(url, migrate=False)
    with factory() as s:
        run = runs.get_run(s, "old1")
        assert run.name == "before upgrade" and run.status == "succeeded"
        assert [m.metrics["loss"] for m in metrics.step_records(s, "old1")] == [2.5]
        assert deployments.latest_deployment(s, "old1") is None  # new table usable


def test_models_match_migrations(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    upgrade_database(url)
    with make_engine(url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_concurrent_startup_migrations(tmp_path):
    """The dashboard and a worker starting together must not both create the tables."""
    url = f"sqlite:///{tmp_path / 'race.sqlite'}"
    code = f"from runstore.db import upgrade_database; upgrade_database({url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert current_revision(make_engine(url)) == HEAD


def test_ingest_dedups_and_keeps_newest(factory):
    _run(factory)
    recs = [{"type": "start", "ts": 1.0, "total_steps": 4},
            {"type": "train", "ts": 1.0, "epoch": 0, "step": 1, "total_steps": 4, "metrics": {"loss": 3.0}},
            {"type": "train", "ts": 2.0, "epoch": 0, "step": 2, "total_steps": 4, "metrics": {"loss": 2.0}},
            {"type": "val", "ts": 2.5, "epoch": 0, "step": 2, "metrics": {"loss": 2.2}},
            {"type": "checkpoint", "ts": 2.6, "epoch": 0, "step": 2, "path": "/c/0", "val_loss": 2.2, "is_best": True}]
    with factory() as s:
        stage_id = stages.get_stage(s, "r1", "train").id
        metrics.ingest_records(s, "r1", recs, stage_id=stage_id)
        metrics.ingest_records(s, "r1", recs, stage_id=stage_id)  # a re-read after restart
        # a resumed trainer re-emits step 2 with new values, then goes on
        metrics.ingest_records(s, "r1", [
            {"type": "train", "ts": 9.0, "epoch": 1, "step": 2, "total_steps": 4, "metrics": {"loss": 1.9}},
            {"type": "checkpoint", "ts": 9.5, "epoch": 1, "step": 4, "path": "/c/1", "val_loss": 1.0, "is_best": True}],
            stage_id=stage_id)
        rows = metrics.step_records(s, "r1")
        assert [(type(m), m.step) for m in rows] == [(TrainRecord, 1), (TrainRecord, 2), (ValRecord, 2)]
        assert rows[1].metrics["loss"] == 1.9 and rows[1].epoch == 1 and rows[1].total_steps == 4
        ck = metrics.checkpoints(s, "r1")
        assert [(c.epoch, c.is_best) for c in ck] == [(0, False), (1, True)]
        assert metrics.best_checkpoint(s, "r1").path == "/c/1"
        st = stages.get_stage(s, "r1", "train")
        assert (st.current_step, st.total_steps) == (2, 4)


def test_cancel_resume_delete_rules(factory):
    _run(factory)
    with factory() as s:
        runs.request_cancel(s, "r1")  # nothing running: cancelled at once
        run = runs.get_run(s, "r1")
        assert run.status == "cancelled"
        assert {x.status for x in run.stages} == {"cancelled"}
        with pytest.raises(errors.StoreError):
            runs.request_cancel(s, "r1")
        todo = runs.resume_run(s, "r1")
        assert todo == ["prepare", "vocab", "datagen", "train"]
        with pytest.raises(errors.StoreError, match="cancel it before deleting"):
            runs.delete_run(s, "r1")
        stages.start_stage(s, "r1", "prepare", worker="w", log_path="/l")
        stages.finish_stage(s, "r1", "prepare", "succeeded")
        stages.start_stage(s, "r1", "vocab", worker="w", log_path="/l")
        stages.finish_stage(s, "r1", "vocab", "failed", "boom")
        run = runs.get_run(s, "r1")
        assert run.status == "failed" and "vocab" in run.error and "boom" in run.error
        assert runs.resume_run(s, "r1", from_stage="vocab") == ["vocab", "datagen", "train"]
        assert stages.get_stage(s, "r1", "prepare").status == "succeeded"
        # the outbox holds the original start, the resume, the next stage queued in the same
        # transaction as prepare's success, and the retry
        assert [m.payload["stages"][0] for m in outbox.pending(s)] == ["prepare", "prepare", "vocab", "vocab"]
        runs.request_cancel(s, "r1")
        assert runs.delete_run(s, "r1") == "/tmp/r1"
        assert runs.get_run(s, "r1") is None


def test_outbox_claim_is_exclusive(factory):
    _run(factory)
    with factory() as s:
        (msg,) = outbox.pending(s)
        assert outbox.claim(s, msg.id)
        assert not outbox.claim(s, msg.id)  # a second dispatcher skips it
        outbox.mark_failed(s, msg.id, "broker down")
        assert outbox.claim(s, msg.id)
        outbox.mark_sent(s, msg.id)
        assert outbox.pending(s) == []


def test_recover_interrupted_marks_run_resumable(factory):
    _run(factory, "a")
    _run(factory, "b")
    with factory() as s:
        for rid in ("a", "b"):
            stages.start_stage(s, rid, "prepare", worker="gpu0@host" if rid == "a" else "gpu1@other", log_path="/l")
        # b's worker is alive elsewhere (fresh heartbeat): untouched
        found = stages.recover_interrupted(s, worker="gpu0@host", stale_after_s=60)
        assert found == [("a", "prepare")]
        assert runs.get_run(s, "a").status == "interrupted"
        assert runs.get_run(s, "b").status == "running"
        stage = stages.get_stage(s, "b", "prepare")
        stage.heartbeat_at = utcnow() - timedelta(seconds=120)
        s.commit()
        assert stages.recover_interrupted(s, worker="gpu0@host", stale_after_s=60) == [("b", "prepare")]


def test_wal_reader_not_blocked_by_writer(factory, tmp_path):
    """The dashboard reads while a worker holds a write transaction."""
    _run(factory)
    with factory() as writer, factory() as reader:
        writer.add(Stage(run_id="r1", name="extra", position=9, status="pending", attempts=0))
        writer.flush()  # write transaction open
        t0 = time.monotonic()
        assert len(runs.list_runs(reader)) == 1
        assert time.monotonic() - t0 < 1.0
        writer.rollback()


def test_cancel_with_dead_worker_does_not_hang(factory):
    _run(factory)
    with factory() as s:
        stages.start_stage(s, "r1", "prepare", worker="gone@host", log_path="/l")
        runs.request_cancel(s, "r1")
        assert runs.get_run(s, "r1").status == "running"  # live worker: it stops the stage
        stage = stages.get_stage(s, "r1", "prepare")
        stage.heartbeat_at = utcnow() - timedelta(seconds=300)
        run = runs.get_run(s, "r1")
        run.cancel_requested = False
        s.commit()
        runs.request_cancel(s, "r1")  # its worker died a while ago
        assert runs.get_run(s, "r1").status == "cancelled"


def test_ingest_keeps_every_trainer_metric_key(factory):
    """The trainer's own metric dict (full/cond/step accuracy per TTT step) is stored whole and
    lands in the dashboard chart group of its meaning."""
    import torch

    from app import views
    from speculators.train.losses import summarize

    _run(factory)
    stats = torch.tensor([[2.0, 4.0, 3.0, 3.0, 4.0], [3.0, 3.0, 2.0, 1.0, 3.0]])
    values = {**summarize(stats, 1.0), "lr": 1e-3, "tokens_per_s": 10.0}
    with factory() as s:
        stage_id = stages.get_stage(s, "r1", "train").id
        metrics.ingest_records(s, "r1", [{"type": "train", "ts": 1.0, "epoch": 0, "step": 1, "total_steps": 4,
                                          "metrics": values}], stage_id=stage_id)
        rows = metrics.step_records(s, "r1")
    assert rows[0].metrics == values and rows[0].metrics["step_acc_1"] == pytest.approx(2 / 3)
    groups = dict(views.chart_frames(views.metrics_long(rows)))
    assert set(groups["Step accuracy: step k alone"]["metric"]) == {"step_acc_0", "step_acc_1"}
    assert set(groups["Full accuracy: steps 0..k all right"]["metric"]) == {"full_acc_0", "full_acc_1"}
    assert set(groups["Conditional accuracy: step k given 0..k-1 right"]["metric"]) == {"cond_acc_0", "cond_acc_1"}
