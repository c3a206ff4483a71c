"""Run store: migrations keep old runs, WAL mode, metric de-duplication, outbox, recovery.

The `factory` tests run on both backends (`store_url` in conftest: a SQLite file and a fresh
PostgreSQL schema); the ones that read SQLite's own files, pragmas or query plans use
`sqlite_factory`."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import text

from runstore import deployments, errors, metrics, outbox, runs, stages
from runstore.db import current_revision, make_engine, open_store, upgrade_database
from runstore.models import Base, Stage, utcnow
from speculators.metric_records import AcceptanceRecord, TrainRecord, ValRecord
from tests.support import store_writers as writers

HEAD = "0005"


@pytest.fixture()
def factory(store_url):
    return open_store(store_url)


@pytest.fixture()
def sqlite_factory(tmp_path):
    return open_store(f"sqlite:///{tmp_path / 'runs.sqlite'}")


def _run(factory, run_id="r1", names=("prepare", "vocab", "datagen", "train")):
    with factory() as s:
        return runs.create_run(s, run_id=run_id, name="demo", spec={"mode": "offline"}, stages=list(names),
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


def test_models_match_migrations(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade_database(store_url)
    with make_engine(store_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if store_url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_concurrent_startup_migrations(store_url):
    """The dashboard and a worker starting together must not both create the tables."""
    url = store_url
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


def test_wal_reader_not_blocked_by_writer(sqlite_factory):
    """The dashboard reads while a worker holds a write transaction."""
    factory = sqlite_factory
    _run(factory)
    with factory() as writer, factory() as reader:
        assert reader.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        writer.add(Stage(run_id="r1", name="extra", position=9, status="pending", attempts=0))
        writer.flush()  # write transaction open
        # A reader that had to wait would fail at once instead of waiting (no busy timeout).
        reader.execute(text("PRAGMA busy_timeout = 0"))
        assert len(runs.list_runs(reader)) == 1
        assert stages.get_stage(reader, "r1", "extra") is None  # the writer's row is not visible yet
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


def test_acceptance_records_round_trip_through_the_store(factory):
    """Acceptance records keep their fields, upsert on (run, acceptance, step), stay out of the
    train/val charts' rows, and skip a malformed line."""
    _run(factory)
    first = AcceptanceRecord(epoch=0, step=3, mean_acceptance_length=1.5, acceptance_rate_per_position=[0.4, 0.1],
                             prompts=8, tokens=256, seconds=0.75, ts=3.0)
    second = AcceptanceRecord(epoch=0, step=5, mean_acceptance_length=1.75, acceptance_rate_per_position=[0.5, 0.25],
                              prompts=8, tokens=250, seconds=0.5, ts=5.0)
    redone = AcceptanceRecord(epoch=1, step=5, mean_acceptance_length=2.0, acceptance_rate_per_position=[0.6, 0.4],
                              prompts=8, tokens=240, seconds=0.25, ts=9.0)  # a resumed run re-emits step 5
    bad = {**first.to_dict(), "step": 4, "acceptance_rate_per_position": "high"}
    with factory() as s:
        written = metrics.ingest_records(s, "r1", [first.to_dict(), second.to_dict(), bad, redone.to_dict()])
        assert written == 3
        assert metrics.acceptance_records(s, "r1") == [first, redone]
        assert metrics.step_records(s, "r1") == []


def _columns(con, table):
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def _indexes(con, table):
    return {r[1] for r in con.execute(f"PRAGMA index_list({table})")}


def test_upgrade_from_previous_release_fills_new_columns_and_downgrades(tmp_path):
    """A database made by the previous release (0002) with rows in every table: the upgrade
    keeps them, fills outbox.run_id and metrics.total_steps, adds the index; downgrade works."""
    path = tmp_path / "prev.sqlite"
    url = f"sqlite:///{path}"
    upgrade_database(url, "0002")
    con = sqlite3.connect(path)
    con.execute("INSERT INTO runs (id, name, spec, status, work_dir, cancel_requested, created_at, updated_at) "
                "VALUES ('old1', 'before upgrade', '{}', 'running', '/w', 0, '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00')")
    con.execute("INSERT INTO stages (run_id, name, position, status, attempts, total_steps) "
                "VALUES ('old1', 'prepare', 0, 'succeeded', 1, 7), ('old1', 'train', 1, 'pending', 0, 40)")
    con.execute("INSERT INTO metrics (run_id, type, step, epoch, ts, \"values\") VALUES "
                "('old1', 'train', 3, 0, 1.0, '{\"loss\": 2.5}'), ('old1', 'val', 3, 0, 2.0, '{\"loss\": 2.7}')")
    con.execute("INSERT INTO outbox (kind, payload, created_at, sent_at, attempts) VALUES "
                "('run_stages', '{\"run_id\": \"old1\", \"stages\": [\"train\"]}', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:01', 1), "
                "('serve', '{\"deployment_id\": 4}', '2026-01-01 00:00:00', NULL, 0)")
    con.execute("INSERT INTO deployments (kind, model_path, status, created_at, updated_at) "
                "VALUES ('draft', '/ck', 'stopped', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    con.commit()
    assert "run_id" not in _columns(con, "outbox") and "ix_outbox_run_kind_sent" not in _indexes(con, "outbox")
    con.close()

    upgrade_database(url)
    con = sqlite3.connect(path)
    assert "ix_outbox_run_kind_sent" in _indexes(con, "outbox")
    assert sorted(con.execute("SELECT kind, run_id FROM outbox")) == [("run_stages", "old1"), ("serve", None)]
    assert sorted(con.execute("SELECT type, step, total_steps FROM metrics")) == [("train", 3, 40),
                                                                                ("val", 3, None)]
    assert con.execute("SELECT count(*) FROM deployments").fetchone() == (1,)
    con.close()
    factory = open_store(url, migrate=False)
    with factory() as s:
        assert [(type(r), r.step, r.metrics["loss"]) for r in metrics.step_records(s, "old1")] == [
            (TrainRecord, 3, 2.5), (ValRecord, 3, 2.7)]
        assert metrics.step_records(s, "old1", kind="train")[0].total_steps == 40
        # the old message was sent long ago and nothing runs: the migrated run is due
        assert runs.due_runs(s, grace_s=30) == [("old1", "train")]

    from alembic import command

    from runstore.db import alembic_config

    command.downgrade(alembic_config(url), "0002")
    con = sqlite3.connect(path)
    assert "run_id" not in _columns(con, "outbox") and "total_steps" not in _columns(con, "metrics")
    assert "ix_outbox_run_kind_sent" not in _indexes(con, "outbox")
    assert con.execute("SELECT count(*) FROM outbox").fetchone() == (2,)
    assert con.execute("SELECT count(*) FROM metrics").fetchone() == (2,)
    con.close()
    assert current_revision(make_engine(url)) == "0002"


def _age(factory, run_id, *, sent_s=None, finished_s=None):
    """Move a run's messages' delivery (and its stages' ends) `sent_s` (`finished_s`) seconds into the past."""
    from runstore.models import OutboxMessage

    with factory() as s:
        if sent_s is not None:
            for m in s.query(OutboxMessage).filter(OutboxMessage.run_id == run_id):
                m.sent_at = utcnow() - timedelta(seconds=sent_s)
        if finished_s is not None:
            for st in s.query(Stage).filter(Stage.run_id == run_id, Stage.finished_at.is_not(None)):
                st.finished_at = utcnow() - timedelta(seconds=finished_s)
        s.commit()


def test_due_runs_rules(factory):
    """Each thing that says a run's next stage is on its way keeps it off the due list."""
    for rid in ("unsent", "sent_long_ago", "sent_recently", "live", "stale", "cancelling", "done"):
        _run(factory, rid, names=("prepare", "train"))
    _age(factory, "unsent")  # its start message is still pending
    _age(factory, "sent_long_ago", sent_s=600)
    _age(factory, "sent_recently", sent_s=5)
    for rid in ("live", "stale", "cancelling", "done"):
        _age(factory, rid, sent_s=600)
    with factory() as s:
        stages.start_stage(s, "live", "prepare", worker="w", log_path="/l")
        stages.start_stage(s, "stale", "prepare", worker="w", log_path="/l")
        stages.get_stage(s, "stale", "prepare").heartbeat_at = utcnow() - timedelta(seconds=120)
        runs.get_run(s, "cancelling").cancel_requested = True
        s.commit()
        for name in ("prepare", "train"):
            stages.start_stage(s, "done", name, worker="w", log_path="/l")
            stages.finish_stage(s, "done", name, "succeeded")
    _age(factory, "done", sent_s=600, finished_s=600)
    with factory() as s:
        due = runs.due_runs(s, grace_s=30)
    assert sorted(due) == [("sent_long_ago", "prepare"), ("stale", "prepare")]

    # a stage that ended within the grace period: its successor's message may be on its way
    with factory() as s:
        stages.finish_stage(s, "sent_long_ago", "prepare", "succeeded")
    _age(factory, "sent_long_ago", sent_s=600)
    with factory() as s:
        assert runs.due_runs(s, grace_s=30) == [("stale", "prepare")]
    _age(factory, "sent_long_ago", finished_s=600)
    with factory() as s:
        assert sorted(runs.due_runs(s, grace_s=30)) == [("sent_long_ago", "train"), ("stale", "prepare")]
        # the reconciler's action queues the unfinished stages again; then nothing is due
        assert runs.requeue(s, "stale") == ["prepare", "train"]
        assert runs.requeue(s, "sent_long_ago") == ["train"]
        assert runs.due_runs(s, grace_s=30) == []


def test_due_runs_reads_the_outbox_through_its_index(sqlite_factory):
    """The due-run query is one statement that finds a run's messages by the (run_id, kind,
    sent_at) index instead of reading every message (SQLite's own query plan says which)."""
    from sqlalchemy import event

    factory = sqlite_factory
    _run(factory)
    seen: list[tuple[str, object]] = []
    with factory() as s:
        engine = s.get_bind()

        def capture(conn, cursor, statement, parameters, context, executemany):
            seen.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            runs.due_runs(s, grace_s=30)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        (statement, params), = seen
        raw = s.connection().connection.driver_connection
        plan = " | ".join(row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + statement, params))
    assert "INDEX ix_outbox_run_kind_sent" in plan, plan
    assert "SCAN outbox" not in plan, plan


def test_outbox_rows_are_pruned_after_delivery(factory):
    from runstore.models import OutboxMessage

    for rid in ("a", "b", "c"):
        _run(factory, rid)
    with factory() as s:
        ids = [m.id for m in outbox.pending(s)]
        outbox.mark_sent(s, ids[0])
        outbox.mark_sent(s, ids[1])
        s.get(OutboxMessage, ids[0]).sent_at = utcnow() - timedelta(seconds=outbox.KEEP_SENT_S + 60)
        s.get(OutboxMessage, ids[1]).sent_at = utcnow() - timedelta(seconds=outbox.KEEP_SENT_S - 60)
        s.commit()
        assert s.query(OutboxMessage).count() == 3  # nothing is pruned until the next delivery
        outbox.mark_sent(s, ids[2])
        left = sorted(m.id for m in s.query(OutboxMessage))
    assert left == [ids[1], ids[2]]  # the one delivered past the bound is gone
    _run(factory, "d")
    with factory() as s:
        (waiting,) = outbox.pending(s)
        outbox.mark_sent(s, ids[2], keep_s=0)  # everything delivered before now goes
        assert sorted(m.id for m in s.query(OutboxMessage)) == [ids[2], waiting.id]  # an unsent one never does


def test_a_stage_alive_elsewhere_cannot_be_claimed_until_its_heartbeat_is_stale(factory):
    _run(factory)
    with factory() as s:
        assert stages.start_stage(s, "r1", "prepare", worker="a", log_path="/l") is not None
        assert stages.start_stage(s, "r1", "prepare", worker="b", log_path="/l") is None
        assert stages.any_live(s, "r1")
        stages.get_stage(s, "r1", "prepare").heartbeat_at = utcnow() - timedelta(seconds=stages.STALE_AFTER_S + 1)
        s.commit()
        assert not stages.any_live(s, "r1")
        assert stages.start_stage(s, "r1", "prepare", worker="b", log_path="/l").worker == "b"


# --- several writers at once (several hosts' workers on one PostgreSQL store) -----------------

def _processes(target, args_for, n):
    import multiprocessing

    import sys
    import types

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), barrier, out)) for i in range(n)]
    # A spawned child first re-runs the parent's __main__; in a whole-suite run Streamlit's AppTest
    # leaves a dashboard page script there, which fails outside Streamlit. The targets live in an
    # importable module (tests.support.store_writers), so the children need no __main__ at all.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        for p in procs:
            p.start()
    finally:
        sys.modules["__main__"] = main
    for p in procs:
        p.join(120)  # a process that failed exits at once (its error is in the output)
    assert [p.exitcode for p in procs] == [0] * n
    return [out.get(timeout=10) for _ in procs]


def test_concurrent_workers_claim_each_stage_once(pg_database):
    """Three worker processes (as on three hosts) race for the same 12 stages on PostgreSQL:
    each stage is claimed by exactly one of them, and the row names that one (the conditional
    UPDATE of start_stage)."""
    store_url = pg_database.fresh_url()
    factory = open_store(store_url)
    run_ids = [f"c{i}" for i in range(12)]
    for rid in run_ids:
        _run(factory, rid, names=("prepare",))
    results = _processes(writers.claim_all, lambda i: (store_url, f"gpu0@host{i}", run_ids), 3)
    winners = {rid: [w for w, won in results if rid in won] for rid in run_ids}
    assert all(len(w) == 1 for w in winners.values()), winners
    with factory() as s:
        for rid, (w,) in winners.items():
            st = stages.get_stage(s, rid, "prepare")
            assert (st.status, st.worker, st.host, st.attempts) == ("running", w, w, 1)


def test_concurrent_writers_keep_one_metric_row_per_key(pg_database):
    """Three processes write the same (run, type, step) keys at once on PostgreSQL: no write
    fails, and each key holds one row whose values are one writer's."""
    store_url = pg_database.fresh_url()
    factory = open_store(store_url)
    _run(factory)
    steps = 30
    assert sorted(_processes(writers.write_metrics, lambda i: (store_url, i, steps), 3)) == [0, 1, 2]
    with factory() as s:
        rows = metrics.step_records(s, "r1")
        counts = s.execute(text("SELECT type, count(*), count(DISTINCT step) FROM metrics GROUP BY type "
                                "ORDER BY type")).all()
    assert [tuple(c) for c in counts] == [("train", steps, steps), ("val", steps, steps)]
    assert {r.metrics["loss"] for r in rows} <= {0.0, 1.0, 2.0}


def test_postgres_upgrade_from_previous_release_fills_run_id_and_adds_host(pg_database):
    """0003's data step in PostgreSQL's JSON syntax, and 0004, on a database with old rows."""
    url = pg_database.fresh_url()
    upgrade_database(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO runs (id, name, spec, status, work_dir, cancel_requested, created_at, "
                          "updated_at) VALUES ('old1', 'before', '{}', 'running', '/w', false, now(), now())"))
        conn.execute(text("INSERT INTO stages (run_id, name, position, status, attempts, total_steps, worker) "
                          "VALUES ('old1', 'train', 0, 'succeeded', 1, 40, 'gpu0@a')"))
        conn.execute(text("INSERT INTO metrics (run_id, type, step, epoch, ts, \"values\") "
                          "VALUES ('old1', 'train', 3, 0, 1.0, '{\"loss\": 2.5}')"))
        conn.execute(text("INSERT INTO outbox (kind, payload, created_at, attempts) VALUES "
                          "('run_stages', '{\"run_id\": \"old1\", \"stages\": [\"train\"]}', now(), 0), "
                          "('serve', '{\"deployment_id\": 4}', now(), 0)"))
    upgrade_database(url)
    assert current_revision(engine) == HEAD
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT kind, run_id FROM outbox")).all(), key=str) == [
            ("run_stages", "old1"), ("serve", None)]
        assert conn.execute(text("SELECT total_steps FROM metrics")).scalar() == 40
        assert conn.execute(text("SELECT worker, host FROM stages")).one() == ("gpu0@a", None)
    engine.dispose()


def test_claim_records_the_host(factory):
    _run(factory)
    with factory() as s:
        st = stages.start_stage(s, "r1", "prepare", worker="gpu0@box", log_path="/l", host="box.example")
        assert (st.worker, st.host) == ("gpu0@box", "box.example")
    with factory() as s:
        assert runs.get_run(s, "r1").stages[0].host == "box.example"
