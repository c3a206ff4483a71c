"""A joining node of a multi-node train stage rides out a run-store restart: its rank claim,
its beats while it waits for node 0 and while its trainer runs all wait for PostgreSQL and go
on, and the claim stays exactly-once when its reply is lost.

The database "restart" is the TCP forwarder of tests.support.tcp_forward between the joining
node's engine and the real server, stopped and started: to the node that is what a restart
looks like (refused connections, pooled connections reset), while the server the other tests
share stays up and the test reads the truth through a direct connection."""

from __future__ import annotations

import logging
import sys
import threading
import time

from sqlalchemy import text

from runstore import nodes, open_store, runs, stages
from runstore.models import utcnow
from speculators import process
from worker import multinode

from tests.support.node_judgements import Judged
from tests.support.tcp_forward import forward_database
from tests.support.wait import wait_for

JOINER = "gpu0@b"


def _setup(pg_database, spec_home, tmp_path, monkeypatch):
    """A 3-node run whose train stage node 0 (the test, on a direct connection) has opened;
    the joining worker's settings reach the database only through the forwarder."""
    direct = pg_database.fresh_url()
    truth = open_store(direct)
    forwarded, forward = forward_database(direct)
    settings = spec_home(tmp_path / "b", DB_URL=forwarded)
    monkeypatch.setenv("SPEC_NODE_STALE_S", "2")  # shorter than the outages below
    with truth() as s:
        runs.create_run(s, run_id="r1", name="r1", spec={"nodes": 3, "mode": "offline", "model": "m"},
                        stages=["train"], work_dir=str(tmp_path / "r1"))
        stage = stages.start_stage(s, "r1", "train", worker="gpu0@a", log_path="/l", host="host-a")
        lead = nodes.open_nodes(s, stage.id, stage.attempts, 3, worker="gpu0@a", host="host-a")
        ids = stage.id, stage.attempts, lead.id
    return truth, forward, settings, ids


class LeadBeats:
    """Node 0's heartbeat (the test's direct connection), paused while the database is away:
    node 0's worker could not beat then either."""

    def __init__(self, truth, lead_id: int) -> None:
        self.on, self._end = threading.Event(), threading.Event()
        self.on.set()
        self._thread = threading.Thread(target=self._run, args=(truth, lead_id), daemon=True)
        self._thread.start()

    def _run(self, truth, lead_id: int) -> None:
        while not self._end.wait(0.3):
            if self.on.is_set():
                with truth() as s:
                    nodes.beat(s, lead_id)

    def close(self) -> None:
        self._end.set()
        self._thread.join(5)


def _own_rows(truth, stage_id, attempt):
    with truth() as s:
        return [(r.node_rank, r.status, r.heartbeat_at, r.error) for r in nodes.nodes_of(s, stage_id, attempt)
                if r.worker == JOINER]


def test_a_joining_node_keeps_one_rank_and_beats_through_database_restarts(pg_database, spec_home, tmp_path,
                                                                           monkeypatch, caplog):
    truth, forward, settings, (stage_id, attempt, lead_id) = _setup(pg_database, spec_home, tmp_path, monkeypatch)
    caplog.set_level(logging.WARNING, logger="runstore.db")
    real_claim = nodes.claim_node
    calls: list[int | None] = []

    def claim_then_lose_the_reply(session, *args, **kwargs):
        """The first claim commits, then the database goes away before the node hears back."""
        rank = real_claim(session, *args, **kwargs)
        calls.append(rank)
        if len(calls) == 1:
            forward.stop()
            session.execute(text("SELECT 1"))  # raises: the connection is gone
        return rank

    monkeypatch.setattr(nodes, "claim_node", claim_then_lose_the_reply)
    judged = Judged(monkeypatch)
    got: dict = {}

    def run_join():
        try:
            got["result"] = multinode.join(open_store(settings.db_url, migrate=False), settings, "r1", worker=JOINER)
        except BaseException as exc:  # the outcome the test must not see
            got["error"] = exc

    joiner = threading.Thread(target=run_join, daemon=True)
    lead = LeadBeats(truth, lead_id)
    try:
        joiner.start()
        wait_for(lambda: calls, 20, interval=0.05)
        lead.on.clear()
        time.sleep(2.0)  # the database is away: the claim waits, the task lives
        assert joiner.is_alive() and "error" not in got
        assert [r[:2] for r in _own_rows(truth, stage_id, attempt)] == [(1, "joined")]  # the lost reply's claim
        restarted = time.monotonic()
        forward.start()
        # node 0's own retry has not come round yet: the node, back, judges node 0's beat (older
        # than SPEC_NODE_STALE_S) and does not count it gone; node 0 beats again after that
        wait_for(lambda: judged.spared_stale(restarted), 60, interval=0.05, what="a stale beat spared")
        lead.on.set()
        # the claim is repeated and gets the rank it already holds; beats come while node 0 has no address
        wait_for(lambda: len(calls) == 2, 20, interval=0.05)
        assert calls == [1, 1]
        first_beat = _own_rows(truth, stage_id, attempt)[0][2]
        wait_for(lambda: _own_rows(truth, stage_id, attempt)[0][2] > first_beat, 20, interval=0.05)

        forward.stop()  # a restart while the node waits for node 0's rendezvous
        lead.on.clear()
        time.sleep(3.0)
        assert joiner.is_alive() and "error" not in got
        restarted = time.monotonic()
        forward.start()
        wait_for(lambda: judged.spared_stale(restarted), 60, interval=0.05, what="a stale beat spared")
        lead.on.set()
        back_at = utcnow()
        wait_for(lambda: _own_rows(truth, stage_id, attempt)[0][2] > back_at, 20, interval=0.05)  # beats resumed
        assert joiner.is_alive() and "error" not in got

        with truth() as s:  # node 0 ends the stage: the joining node ends its wait and its task
            stages.finish_stage(s, "r1", "train", "failed", "stopped by the test")
        joiner.join(20)
        assert not joiner.is_alive()
    finally:
        lead.close()
        forward.stop()
    assert got == {"result": "node"}
    rows = _own_rows(truth, stage_id, attempt)
    assert [(rank, status, error) for rank, status, _, error in rows] == [
        (1, "ended", "the stage ended before training started")]  # one rank, never a second
    with truth() as s:
        assert nodes.node(s, stage_id, attempt, 2).status == nodes.FREE
    assert "is unreachable" in caplog.text and "retrying" in caplog.text


def test_a_joining_node_s_trainer_outlives_a_database_restart(pg_database, spec_home, tmp_path, monkeypatch):
    """The training phase (watch_node with the joining node's check): the trainer keeps
    running through the outage, the beats resume, and the node ends with its trainer."""
    truth, forward, settings, (stage_id, attempt, lead_id) = _setup(pg_database, spec_home, tmp_path, monkeypatch)
    factory = open_store(settings.db_url, migrate=False)
    with truth() as s:
        rank = nodes.claim_node(s, stage_id, attempt, worker=JOINER, host="host-b")
        node_id = nodes.node(s, stage_id, attempt, rank).id
    store = multinode.JoinerStore(factory, settings.db_url)
    judged = Judged(monkeypatch)
    done = tmp_path / "trainer-may-end"  # the stand-in trainer runs until the test lets it end
    trainer = process.start([sys.executable, "-c", "import pathlib, sys, time\n"
                             "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.1)", str(done)],
                            log=tmp_path / "trainer.log")
    got: dict = {}

    def run_watch():
        try:
            got["result"] = multinode.watch_node(store, trainer, node_id=node_id, beat_check=lambda s: (
                multinode._joiner_check(s, store, "r1", stage_id, attempt)))
        except BaseException as exc:
            got["error"] = exc

    watcher = threading.Thread(target=run_watch, daemon=True)
    lead = LeadBeats(truth, lead_id)
    try:
        watcher.start()
        wait_for(lambda: judged.any_since(0.0), 60, interval=0.05, what="a check on node 0")  # the trainer runs
        forward.stop()
        lead.on.clear()
        time.sleep(3.0)
        assert watcher.is_alive() and trainer.poll() is None and "error" not in got
        restarted = time.monotonic()
        forward.start()
        # node 0's own retry has not come round yet: its beat, older than SPEC_NODE_STALE_S, is
        # judged and spared; then node 0 beats again
        wait_for(lambda: judged.spared_stale(restarted), 60, interval=0.05, what="a stale beat spared")
        lead.on.set()
        back_at = utcnow()
        wait_for(lambda: _own_rows(truth, stage_id, attempt)[0][2] > back_at, 20, interval=0.05)  # beats resumed
        # past SPEC_NODE_STALE_S after the restart: node 0 is judged on fresh beats again
        wait_for(lambda: judged.fresh_after_grace(restarted, 2.0), 60, interval=0.05, what="a fresh beat judged")
        assert watcher.is_alive() and trainer.poll() is None
        done.write_text("")
        watcher.join(20)
        assert not watcher.is_alive()
    finally:
        lead.close()
        forward.stop()
        trainer.stop(grace_s=1.0)
    assert got == {"result": None}  # ran to its end, not stopped
    assert trainer.poll() == 0
