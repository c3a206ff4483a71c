"""Node 0 of a multi-node train stage rides out a run-store restart: its wait for the other
nodes and its training-time check on them wait for PostgreSQL and go on, and a node that could
not beat during the outage is not counted as gone right after it (it gets SPEC_NODE_STALE_S).

Node 0 is the real worker code (worker.runner.execute_stage) with its database reached only
through the TCP forwarder of tests.support.tcp_forward, stopped and started; the other nodes
are rows the test claims and beats over a direct connection, paused while the database is
away (their workers could not write either). The trainer is a stand-in process that runs
until the test lets it end: what is under test is node 0's bookkeeping around it."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from runstore import nodes, open_store, runs, stages
from speculators.config.run import RunSettings
from worker import runner

from tests.support.node_judgements import Judged
from tests.support.tcp_forward import forward_database
from tests.support.wait import wait_for

LEAD = "gpu0@a"


class PeerBeats:
    """The joining nodes' heartbeats (direct connection), paused while the database is away."""

    def __init__(self, truth) -> None:
        self.ids: list[int] = []
        self.on, self._end = threading.Event(), threading.Event()
        self.on.set()
        self._truth = truth
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._end.wait(0.3):
            if self.on.is_set():
                with self._truth() as s:
                    for node_id in list(self.ids):
                        nodes.beat(s, node_id)

    def claim(self, stage_id: int, attempt: int, worker: str) -> int:
        with self._truth() as s:
            rank = nodes.claim_node(s, stage_id, attempt, worker=worker, host=f"host-{worker}")
            self.ids.append(nodes.node(s, stage_id, attempt, rank).id)
        return rank

    def close(self) -> None:
        self._end.set()
        self._thread.join(5)


@pytest.fixture
def lead(pg_database, spec_home, tmp_path, monkeypatch):
    """Node 0's settings (database behind the forwarder), the direct store, the forwarder, the
    stand-in trainer's go-ahead file and the notes node 0 wrote."""
    direct = pg_database.fresh_url()
    truth = open_store(direct)
    forwarded, forward = forward_database(direct)
    settings = spec_home(tmp_path / "a", DB_URL=forwarded, NODES_WAIT_S=60,
                         WORKER_ADDRESS="127.0.0.1")
    monkeypatch.setenv("SPEC_NODE_STALE_S", "2")  # shorter than the outages below
    done = tmp_path / "trainer-may-end"
    monkeypatch.setattr(runner, "stage_argv", lambda *a, **k: [
        sys.executable, "-c", "import pathlib, sys, time\n"
        "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.1)", str(done)])
    notes: list[str] = []
    real_note = stages.note_stage

    def note(session, stage_id, text):
        notes.append(text)
        return real_note(session, stage_id, text)

    monkeypatch.setattr(stages, "note_stage", note)
    yield settings, truth, forward, done, notes, Judged(monkeypatch)
    forward.stop()


def _start(settings, truth, nnodes: int):
    """The run, and node 0's execute_stage in a thread; (thread, outcome, stage id, attempt)."""
    spec = RunSettings(name="r1", model="org/m", dataset="sharegpt", nodes=nnodes, gpus=0)
    with truth() as s:
        runs.create_run(s, run_id="r1", name="r1", spec=spec.to_dict(), stages=["train"],
                        work_dir=str(settings.runs_root / "r1"))
    got: dict = {}

    def run():
        try:
            got["result"] = runner.execute_stage(open_store(settings.db_url, migrate=False), settings, "r1",
                                                 "train", worker=LEAD)
        except BaseException as exc:  # the outcome the test must not see
            got["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def opened():
        with truth() as s:
            stage = stages.get_stage(s, "r1", "train")
            return stage.status == "running" and nodes.node(s, stage.id, stage.attempts, 0) is not None

    wait_for(opened, 20, interval=0.05)
    with truth() as s:
        stage = stages.get_stage(s, "r1", "train")
        return thread, got, stage.id, stage.attempts


def _published(truth, stage_id, attempt) -> bool:
    with truth() as s:
        return bool(nodes.node(s, stage_id, attempt, 0).address)


def _outage(forward, peers, got, thread, judged: Judged) -> float:
    """A restart: 3 s away (peers silent, past SPEC_NODE_STALE_S), back; the peers beat again
    once node 0 has judged their stale beats and spared them (their own retry comes round
    after node 0's). Returns when the database came back (time.monotonic)."""
    forward.stop()
    peers.on.clear()
    time.sleep(3.0)
    assert thread.is_alive() and "error" not in got
    restarted = time.monotonic()
    forward.start()
    wait_for(lambda: judged.spared_stale(restarted), 60, interval=0.05, what="stale beats spared")
    peers.on.set()
    return restarted


def _finish(truth, done, thread, got, stage_id, attempt) -> None:
    done.write_text("")
    thread.join(20)
    assert not thread.is_alive()
    assert got == {"result": "succeeded"}
    with truth() as s:
        stage = stages.get_stage(s, "r1", "train")
        assert (stage.status, stage.error) == ("succeeded", None)
        assert nodes.node(s, stage_id, attempt, 0).status == nodes.ENDED


def test_node_0_waits_for_the_other_nodes_through_a_database_restart(lead):
    settings, truth, forward, done, notes, judged = lead
    thread, got, stage_id, attempt = _start(settings, truth, nnodes=3)
    peers = PeerBeats(truth)
    try:
        assert peers.claim(stage_id, attempt, "gpu0@b") == 1
        wait_for(lambda: any(n.startswith("waiting for 3 workers on queue gpu: 2 joined") for n in notes), 20,
                 interval=0.05)
        seen = len(notes)
        _outage(forward, peers, got, thread, judged)
        assert not _published(truth, stage_id, attempt)
        assert peers.claim(stage_id, attempt, "gpu0@c") == 2
        wait_for(lambda: _published(truth, stage_id, attempt), 20, interval=0.05)  # the stage proceeds: rendezvous out
        # node 1, silent through the outage, was never dropped from the joined ones
        assert all("1 joined" not in n for n in notes[seen:]), notes[seen:]
        assert notes[-1].startswith("training on 3 nodes, rendezvous at 127.0.0.1:")
        _finish(truth, done, thread, got, stage_id, attempt)
    finally:
        peers.close()


def test_node_0_s_check_on_the_other_nodes_outlives_a_database_restart(lead):
    settings, truth, forward, done, _, judged = lead
    thread, got, stage_id, attempt = _start(settings, truth, nnodes=2)
    peers = PeerBeats(truth)
    try:
        assert peers.claim(stage_id, attempt, "gpu0@b") == 1
        wait_for(lambda: _published(truth, stage_id, attempt), 20, interval=0.05)
        published = time.monotonic()
        # the trainer runs, node 0 beats and checks on node 1
        wait_for(lambda: judged.any_since(published), 60, interval=0.05, what="a check on node 1")
        restarted = _outage(forward, peers, got, thread, judged)
        # past SPEC_NODE_STALE_S after the restart: node 1 judged on fresh beats again
        wait_for(lambda: judged.fresh_after_grace(restarted, 2.0), 60, interval=0.05, what="a fresh beat judged")
        assert thread.is_alive() and "error" not in got
        with truth() as s:
            stage = stages.get_stage(s, "r1", "train")
            assert (stage.status, stage.error) == ("running", f"training on 2 nodes, rendezvous at "
                                                              f"{nodes.node(s, stage_id, attempt, 0).address}")
        _finish(truth, done, thread, got, stage_id, attempt)
    finally:
        peers.close()
