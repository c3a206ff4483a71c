"""What several hosts need of the run store and the shared root: a PostgreSQL store that is
unreachable is named (SPEC_DB_URL) and waited for, losing nothing a worker writes; a joining
worker whose shared runs root is not mounted fails the stage at once and writes nothing."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit

import pytest

from runstore import metrics, open_store, runs, stages
from runstore.db import check_reachable, wait_for_store
from runstore.errors import StoreUnreachable
from runstore.settings import ROOT_MARKER, Settings
from worker.shared_root import shared_root_problem

from tests.support.tcp_forward import Forwarder, free_port, via_port
from tests.support.wait import wait_for


def test_unreachable_store_is_named_and_waited_for_then_used(pg_database, caplog):
    """SPEC_DB_URL points at a port where nothing listens (the database host down): the message
    names SPEC_DB_URL; a worker's wait retries with growing pauses; once the port answers (the
    forwarder to the real server starts) the store is migrated and used."""
    direct = pg_database.fresh_url()
    real = urlsplit(direct)
    port = free_port()
    url = via_port(direct, port)
    with pytest.raises(StoreUnreachable, match=r"SPEC_DB_URL=postgresql://postgres@127\.0\.0\.1:%d/" % port):
        check_reachable(url)

    pauses: list[float] = []
    got: dict = {}

    def sleep(s: float) -> None:
        pauses.append(s)
        time.sleep(0.05)

    caplog.set_level(logging.WARNING, logger="runstore.db")
    waiter = threading.Thread(target=lambda: got.update(factory=wait_for_store(url, first_s=0.1, max_s=0.4,
                                                                            sleep=sleep)))
    waiter.start()
    wait_for(lambda: len(pauses) >= 4, 30, interval=0.05)
    assert pauses[:4] == [0.1, 0.2, 0.4, 0.4]  # doubling, capped
    assert "is unreachable" in caplog.text and "SPEC_DB_URL=" in caplog.text and "retrying" in caplog.text
    forward = Forwarder(port, (real.hostname, real.port))
    forward.start()
    try:
        waiter.join(30)
        assert not waiter.is_alive()
        with got["factory"]() as s:
            runs.create_run(s, run_id="r1", name="n", spec={}, stages=["train"], work_dir="/w")
        with open_store(direct)() as s:  # written to the real server
            assert runs.get_run(s, "r1").name == "n"
    finally:
        forward.stop()


def test_worker_writes_wait_through_an_outage_and_lose_nothing(pg_database):
    """The worker's store calls (worker.runner.storing) retry while the database is away: the
    metrics it read during an outage are written once it is back, exactly once."""
    from worker.runner import storing

    direct = pg_database.fresh_url()
    real = urlsplit(direct)
    open_store(direct)  # migrated
    port = free_port()
    url = via_port(direct, port)
    forward = Forwarder(port, (real.hostname, real.port))
    forward.start()
    try:
        factory = open_store(url, migrate=False)
        store = storing(factory, url)
        store(lambda s: runs.create_run(s, run_id="r1", name="n", spec={}, stages=["train"], work_dir="/w"))
        stage_id = store(lambda s: stages.get_stage(s, "r1", "train").id)
        forward.stop()  # the database goes away; the pooled connection is dead too
        recs = [{"type": "train", "ts": 1.0, "epoch": 0, "step": k, "total_steps": 3, "metrics": {"loss": 1.0 / k}}
                for k in (1, 2, 3)]
        done = threading.Event()
        threading.Thread(target=lambda: (store(lambda s: metrics.ingest_records(s, "r1", recs, stage_id=stage_id)),
                                         done.set()), daemon=True).start()
        assert not done.wait(2.5)  # waiting, not failed
        forward.start()
        assert done.wait(30)
    finally:
        forward.stop()
    with open_store(direct)() as s:
        assert [(r.step, r.metrics["loss"]) for r in metrics.step_records(s, "r1")] == [(1, 1.0), (2, 0.5),
                                                                                     (3, 1.0 / 3)]
        assert stages.get_stage(s, "r1", "train").current_step == 3


def test_joining_worker_without_the_shared_root_fails_the_stage_and_writes_nothing(tmp_path, spec_home):
    """A joining worker (SPEC_REQUIRE_SHARED_ROOT=1) whose runs root is an empty mount point:
    its stage fails at once naming SPEC_RUNS_ROOT and the host; no file appears under the
    root. With the main host's marker there (the root mounted) the check passes."""
    from worker.runner import execute_stage

    main = spec_home(tmp_path / "main")  # the main host: its runs root carries the marker
    assert (main.runs_root / ROOT_MARKER).is_file()
    empty_mount = tmp_path / "mnt" / "runs"
    empty_mount.mkdir(parents=True)
    joining = spec_home(tmp_path / "joining", DB_URL=main.db_url, RUNS_ROOT=empty_mount, REQUIRE_SHARED_ROOT=1)
    assert joining.require_shared_root and list(empty_mount.iterdir()) == []  # ensure_dirs created nothing there
    factory = open_store(main.db_url)
    with factory() as s:
        runs.create_run(s, run_id="r1", name="n", spec={"mode": "offline", "model": "m"}, stages=["prepare"],
                        work_dir=str(empty_mount / "r1"))
    assert execute_stage(factory, joining, "r1", "prepare", worker="gpu0@b") == "failed"
    with factory() as s:
        run = runs.get_run(s, "r1")
        assert run.status == "failed"
        assert f"SPEC_RUNS_ROOT={empty_mount} on host" in run.error and "is not mounted" in run.error
        assert run.stages[0].host  # the dashboard shows where it failed
    assert list(empty_mount.iterdir()) == []  # no log, no run folder on the empty mount point

    (empty_mount / ROOT_MARKER).write_text("x\n")  # the shared root, mounted
    assert shared_root_problem(joining, empty_mount / "r1") is None
    assert "outside" in shared_root_problem(joining, tmp_path / "elsewhere" / "r1")
    assert shared_root_problem(Settings(home=tmp_path / "h", require_shared_root=False), "/nowhere") is None  # the main host checks nothing


def test_run_page_shows_the_host_each_stage_ran_on(store_url):
    """The run page's stage table (app.views.stage_rows) says which host runs what, as the
    claim recorded it in the store, on both backends."""
    from app.views import stage_rows

    factory = open_store(store_url)
    with factory() as s:
        runs.create_run(s, run_id="r1", name="n", spec={}, stages=["prepare", "train"], work_dir="/w")
        stages.start_stage(s, "r1", "prepare", worker="gpu0@a", log_path="/l", host="gpu-host-a")
        stages.finish_stage(s, "r1", "prepare", "succeeded")
        stages.start_stage(s, "r1", "train", worker="gpu0@b", log_path="/l", host="gpu-host-b")
    with factory() as s:
        rows = stage_rows(runs.get_run(s, "r1").stages)
    assert [(r["stage"], r["state"], r["host"]) for r in rows] == [("prepare", "succeeded", "gpu-host-a"),
                                                                   ("train", "running", "gpu-host-b")]


def test_a_stage_task_waits_for_the_store_instead_of_failing(pg_database, tmp_path, spec_home, caplog):
    """The stage task's own entry (worker.tasks._store, also run when the worker starts) with
    SPEC_DB_URL on a database that is down: it logs the unreachable URL and waits; when the
    database comes up it returns a usable store."""
    from worker import tasks

    direct = pg_database.fresh_url()
    real = urlsplit(direct)
    port = free_port()
    spec_home(tmp_path / "home", DB_URL=via_port(direct, port))
    caplog.set_level(logging.WARNING, logger="runstore.db")
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(store=tasks._store()))
    waiter.start()
    wait_for(lambda: "retrying in" in caplog.text, 30, interval=0.05)
    assert f":{port}/" in caplog.text and waiter.is_alive()
    forward = Forwarder(port, (real.hostname, real.port))
    forward.start()
    try:
        waiter.join(60)
        assert not waiter.is_alive()
        _, factory = got["store"]
        with factory() as s:
            runs.create_run(s, run_id="r1", name="n", spec={}, stages=["train"], work_dir="/w")
            assert runs.get_run(s, "r1") is not None
    finally:
        forward.stop()


def test_only_an_unreachable_database_is_waited_for(tmp_path):
    """A statement the database refuses (a missing table: sqlite3 raises it with the class of
    a locked file) propagates at once instead of being retried forever."""
    from sqlalchemy import text

    from runstore.db import retry_unreachable

    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    factory = open_store(url)
    pauses: list[float] = []

    def sleep(s: float) -> None:
        pauses.append(s)
        if len(pauses) > 3:
            raise RuntimeError("retried a refused statement")

    def bad_query():
        with factory() as s:
            return s.execute(text("SELECT * FROM no_such_table")).all()

    with pytest.raises(Exception, match="no such table"):
        retry_unreachable(bad_query, url, sleep=sleep)
    assert pauses == []


def test_a_stage_message_delivered_again_after_its_run_failed_runs_nothing(tmp_path, spec_home, monkeypatch):
    """The broker hands a running stage's message out again when a worker's connection drops
    (the solo pool acks when the stage ends; tests/test_two_hosts_netns.py restarts Redis
    mid-stage). A copy that arrives after the run failed must not start the stage again on
    another host: only Resume, which queues the run anew, does."""
    from worker.runner import execute_stage

    settings = spec_home(tmp_path / "home")
    factory = open_store(settings.db_url)
    with factory() as s:
        runs.create_run(s, run_id="r1", name="n", spec={"mode": "offline", "model": "m"}, stages=["prepare", "vocab"],
                        work_dir=str(settings.runs_root / "r1"))
        stages.start_stage(s, "r1", "prepare", worker="gpu0@a", log_path="/l", host="host-a")
        stages.finish_stage(s, "r1", "prepare", "failed", "the stage's own error")
    assert execute_stage(factory, settings, "r1", "prepare", worker="gpu0@b") == "stale"
    with factory() as s:
        run = runs.get_run(s, "r1")
        prepare = stages.get_stage(s, "r1", "prepare")
        assert run.status == "failed" and run.error == "stage prepare failed: the stage's own error"
        assert (prepare.attempts, prepare.host, prepare.status) == (1, "host-a", "failed")
    with factory() as s:
        assert runs.resume_run(s, "r1") == ["prepare", "vocab"]
    # what the resumed stage then does is not the point: its command line is refused at once
    monkeypatch.setattr("worker.runner.stage_argv", lambda *a, **k: (_ for _ in ()).throw(ValueError("no command")))
    assert execute_stage(factory, settings, "r1", "prepare", worker="gpu0@b") == "failed"
    with factory() as s:
        prepare = stages.get_stage(s, "r1", "prepare")
        assert (prepare.attempts, prepare.worker) == (2, "gpu0@b")  # resumed: it ran again, on b
