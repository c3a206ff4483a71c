"""A two-node train stage stopped while both nodes train, as docs/scaling.md ("Multi-node runs
in the service", step 6) says: a cancel ends both nodes' torchrun and their trainers and the
run is cancelled; a joining node's worker SIGKILLed (its host gone) makes node 0 stop its own
torchrun and fail the stage naming that node, and no trainer is left running.

Node 0 is the worker's code (worker.runner.execute_stage) in a thread of the test; the joining
node is worker.multinode.join in a process of its own (tests.support.join_node), so it can be
killed. Each node runs a real torchrun with the service's c10d rendezvous arguments
(SPEC_WORKER_ADDRESS=127.0.0.1 standing in for two hosts); the trainer is a stand-in that
all-reduces in one gloo group until stopped (tests.support.gloo_loop): what is under test is
how the nodes stop, not training. SQLite store, no broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runstore import nodes, open_store, runs, stages
from speculators.config.run import RunSettings
from worker import runner

from tests.support import gloo_loop
from tests.support.pids import alive
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]
STALE_S = 5


@pytest.fixture
def two_nodes(spec_home, tmp_path, monkeypatch):
    """A 2-node run's train stage with node 0 in a thread and node 1's worker a process, both
    trainers in their collective loop: (store, node 0's outcome, its thread, node 1's process,
    the four pids: trainer and torchrun agent of each node)."""
    settings = spec_home(tmp_path / "home", WORKER_ADDRESS="127.0.0.1", NODES_WAIT_S=60)
    monkeypatch.setenv("SPEC_NODE_STALE_S", str(STALE_S))
    out = tmp_path / "trainers"
    out.mkdir()
    monkeypatch.setattr(runner, "stage_argv", lambda spec, stage, paths, rendezvous=None, **_: (
        gloo_loop.torchrun_argv(rendezvous, out)))
    factory = open_store(settings.db_url)
    spec = RunSettings(name="r1", model="org/m", dataset="sharegpt", nodes=2, gpus=0)
    with factory() as s:
        runs.create_run(s, run_id="r1", name="r1", spec=spec.to_dict(), stages=["train"],
                        work_dir=str(settings.runs_root / "r1"))
    got: dict = {}

    def lead():
        try:
            got["result"] = runner.execute_stage(factory, settings, "r1", "train", worker="gpu0@a")
        except BaseException as exc:  # the outcome the test must not see
            got["error"] = exc

    thread = threading.Thread(target=lead, daemon=True)
    thread.start()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = open(tmp_path / "join.log", "wb")
    joiner = subprocess.Popen([sys.executable, "-m", "tests.support.join_node", "r1", "gpu0@b", str(out)],
                              cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        def in_loop():
            files = [out / f"trainer.{rank}.pid" for rank in (0, 1)]
            return all(f.exists() for f in files) and [int(p) for f in files for p in f.read_text().split()]

        pids = wait_for(in_loop, 300, interval=0.2, what="both trainers in their collective loop")
        assert thread.is_alive() and joiner.poll() is None
        yield factory, got, thread, joiner, pids
    finally:
        if joiner.poll() is None:
            joiner.kill()
        joiner.wait(10)
        log.close()
        thread.join(30)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    for path in [tmp_path / "join.log", *sorted(settings.runs_root.glob("r1/logs/*.log"))]:
        print(f"--- {path.name}\n{path.read_text()[-3000:]}")  # shown when the test fails


def _stage(factory):
    with factory() as s:
        stage = stages.get_stage(s, "r1", "train")
        rows = [(r.node_rank, r.worker, r.status, r.error) for r in nodes.nodes_of(s, stage.id, stage.attempts)]
        return runs.get_run(s, "r1").status, stage.status, stage.error, rows


def test_a_cancel_while_both_nodes_train_ends_both_torchruns(two_nodes):
    factory, got, thread, joiner, pids = two_nodes
    with factory() as s:
        runs.request_cancel(s, "r1")
    thread.join(30)
    assert not thread.is_alive() and got == {"result": "cancelled"}
    assert joiner.wait(30) == 0  # node 1's task ended on its own, through its heartbeat
    wait_for(lambda: not any(map(alive, pids)), 30, what="both trainers and both torchruns to end")
    run_status, status, error, rows = _stage(factory)
    assert (run_status, status, error) == ("cancelled", "cancelled", "cancelled by the user")
    assert rows == [(0, "gpu0@a", nodes.ENDED, "cancelled by the user"),
                    (1, "gpu0@b", nodes.ENDED, "cancelled by the user")]


def test_a_joining_node_killed_mid_training_fails_the_stage_naming_it(two_nodes):
    factory, got, thread, joiner, pids = two_nodes
    joiner.send_signal(signal.SIGKILL)  # node 1's worker dies, its torchrun with it (its lifeline)
    joiner.wait(10)
    thread.join(STALE_S + 40)
    assert not thread.is_alive() and got == {"result": "failed"}
    wait_for(lambda: not any(map(alive, pids)), 30, what="both trainers and both torchruns to end")
    run_status, status, error, rows = _stage(factory)
    assert (run_status, status) == ("failed", "failed")
    assert error.startswith(f"node 1 (worker gpu0@b on host {socket.gethostname()}) is missing: no heartbeat "
                            f"for {STALE_S} s (its worker or host stopped)"), error
    assert rows[0][:3] == (0, "gpu0@a", nodes.FAILED)
