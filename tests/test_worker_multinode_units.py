"""The parts of multi-node runs and several verifier URLs that need no second worker: the
launch line of one node (read back by torchrun's own parser), node claims in the run store
(SQLite and PostgreSQL), what node 0 says about a missing node, node 0 waiting for workers
that never come (the message while it waits, the refusal when it gives up, a cancel), and a
run with two verifier URLs (each checked, both on the train stage's command line)."""

from __future__ import annotations

import argparse
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from runstore import nodes, open_store, runs, stages
from runstore.models import StageNode, utcnow
from runstore.settings import Settings
from speculators.config.files import add_config_option, parse_args
from speculators.config.run import RunSettings
from speculators.config.stages import Rendezvous, StagePaths, launch_argv
from speculators.train.cli import add_train_arguments, config_from_args
from worker import multinode
from worker.pipeline import stage_argv
from worker.spec import endpoint_error, validate_spec

from tests.support.store import local_model
from tests.support.wait import wait_for


# ------------------------------------------------------------------ the launch line


def test_launch_line_of_one_node_of_several():
    rdzv = Rendezvous(nnodes=3, endpoint="10.1.2.3:29411", rdzv_id="run7-a2", is_host=True, local_addr="10.1.2.3")
    argv = launch_argv(["train", "--config", "/r/settings/train.json"], python="/py", torchrun_procs=4,
                       rendezvous=rdzv)
    assert argv == ["/py", "-m", "torch.distributed.run", "--nnodes", "3", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "10.1.2.3:29411", "--rdzv-id", "run7-a2", "--rdzv-conf", "is_host=1",
                    "--local-addr", "10.1.2.3", "--nproc_per_node", "4", "-m", "speculators.train",
                    "--config", "/r/settings/train.json"]
    # torchrun's own parser reads what each node needs from it
    args = get_args_parser().parse_args(argv[3:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id,
            args.rdzv_conf, args.local_addr, args.module, args.training_script,
            args.training_script_args) == ("3", "4", "c10d", "10.1.2.3:29411", "run7-a2", "is_host=1",
                                           "10.1.2.3", True, "speculators.train",
                                           ["--config", "/r/settings/train.json"])
    assert not args.standalone
    other = launch_argv(["train", "--config", "f"], python="/py", torchrun_procs=None,
                        rendezvous=Rendezvous(nnodes=2, endpoint="h0:1", rdzv_id="x", is_host=False))
    assert other[3:15] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h0:1", "--rdzv-id", "x",
                           "--rdzv-conf", "is_host=0", "--nproc_per_node", "1"]
    # one node: unchanged
    assert launch_argv(["train", "--config", "f"], python="/py", torchrun_procs=2)[3:6] == [
        "--standalone", "--nproc_per_node", "2"]


def test_a_cpu_node_runs_one_trainer_under_torchrun(tmp_path):
    spec = RunSettings(name="n", model="org/m", dataset="sharegpt", gpus=0, nodes=2)
    paths = StagePaths(tmp_path)
    rdzv = Rendezvous(nnodes=2, endpoint="127.0.0.1:5", rdzv_id="r", is_host=True)
    argv = stage_argv(spec, "train", paths, python="/py", rendezvous=rdzv)
    args = get_args_parser().parse_args(argv[3:])
    assert (args.nnodes, args.nproc_per_node) == ("2", "1")
    assert stage_argv(spec, "train", paths, python="/py")[1:3] == ["-m", "speculators"]  # no rendezvous: one process


# ------------------------------------------------------------------ node claims


def _stage(factory, run_id="r1", nnodes=3):
    with factory() as s:
        runs.create_run(s, run_id=run_id, name=run_id, spec={"nodes": nnodes}, stages=["train"], work_dir="/w")
        stage = stages.start_stage(s, run_id, "train", worker="w0", log_path="/w/l", host="h0")
        return stage.id, stage.attempts


def test_node_ranks_are_claimed_once_each(store_url):
    factory = open_store(store_url)
    stage_id, attempt = _stage(factory)
    with factory() as s:
        nodes.open_nodes(s, stage_id, attempt, 3, worker="w0", host="h0")
    got: dict[str, int | None] = {}
    barrier = threading.Barrier(6)

    def claim(name):
        barrier.wait()
        with factory() as s:
            got[name] = nodes.claim_node(s, stage_id, attempt, worker=name, host="h")

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r for r in got.values() if r is not None) == [1, 2]  # six workers, two free ranks
    with factory() as s:
        rows = nodes.nodes_of(s, stage_id, attempt)
        assert [(r.node_rank, r.status) for r in rows] == [(0, "joined"), (1, "joined"), (2, "joined")]
        assert {r.worker for r in rows[1:]} == {w for w, r in got.items() if r is not None}
        assert nodes.claim_node(s, stage_id, attempt + 1, worker="late", host="h") is None  # no such attempt


def test_a_repeated_claim_keeps_the_rank_the_worker_holds(store_url):
    """A claim repeated by the same worker (its first reply lost) gets the same rank, never a
    second one; once that node has run, the worker gets none for the attempt."""
    factory = open_store(store_url)
    stage_id, attempt = _stage(factory)
    with factory() as s:
        first = nodes.open_nodes(s, stage_id, attempt, 3, worker="w0", host="h0")
        # node 0 opening again (its reply lost to a database restart) keeps the rows it wrote
        assert nodes.open_nodes(s, stage_id, attempt, 3, worker="w0", host="h0").id == first.id
        assert len(nodes.nodes_of(s, stage_id, attempt)) == 3
        assert [nodes.claim_node(s, stage_id, attempt, worker="w1", host="h") for _ in range(3)] == [1, 1, 1]
        assert nodes.claim_node(s, stage_id, attempt, worker="w2", host="h") == 2
        nodes.end_node(s, nodes.node(s, stage_id, attempt, 1).id, nodes.ENDED)
        assert nodes.claim_node(s, stage_id, attempt, worker="w1", host="h") is None
        assert [(r.node_rank, r.worker, r.status) for r in nodes.nodes_of(s, stage_id, attempt)] == [
            (0, "w0", "joined"), (1, "w1", "ended"), (2, "w2", "joined")]


def test_node_0_names_the_node_that_failed_or_went_missing(store_url):
    factory = open_store(store_url)
    stage_id, attempt = _stage(factory, nnodes=2)
    with factory() as s:
        nodes.open_nodes(s, stage_id, attempt, 2, worker="gpu0@a", host="host-a")
        assert nodes.claim_node(s, stage_id, attempt, worker="gpu0@b", host="host-b") == 1
    store = multinode.JoinerStore(factory, store_url)
    assert multinode.peer_problem(store, stage_id, attempt, 0) is None
    assert multinode.failure_message(store, stage_id, attempt, "exit code 1", settle_s=0) == "exit code 1"
    with factory() as s:  # node 1's worker stopped beating 40 s ago
        row = nodes.node(s, stage_id, attempt, 1)
        row.heartbeat_at = utcnow() - timedelta(seconds=40)
        s.commit()
    assert multinode.peer_problem(store, stage_id, attempt, 0, stale_after_s=30) == (
        "node 1 (worker gpu0@b on host host-b) is missing: no heartbeat for 30 s (its worker or host stopped)")
    with factory() as s:
        nodes.end_node(s, nodes.node(s, stage_id, attempt, 1).id, nodes.FAILED, "RuntimeError: gloo connection reset")
    assert multinode.failure_message(store, stage_id, attempt, "exit code 1", settle_s=0) == (
        "node 1 (worker gpu0@b on host host-b) failed: RuntimeError: gloo connection reset; node 0: exit code 1")


# ------------------------------------------------------------------ node 0 alone


def _train_only_run(settings: Settings, run_id: str, nnodes: int = 2):
    factory = open_store(settings.db_url)
    spec = RunSettings(name=run_id, model="org/m", dataset="sharegpt", nodes=nnodes, gpus=0)
    with factory() as s:
        runs.create_run(s, run_id=run_id, name=run_id, spec=spec.to_dict(), stages=["train"],
                        work_dir=str(settings.runs_root / run_id))
    return factory


def _execute_in_thread(factory, settings, run_id):
    from worker.runner import execute_stage

    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "result", execute_stage(factory, settings, run_id, "train", worker="gpu0@only")))
    thread.start()
    return thread, out


def _wait_note(factory, run_id, timeout=20.0):
    def note():
        with factory() as s:
            stage = stages.get_stage(s, run_id, "train")
            return stage.error if stage.status == "running" else None

    return wait_for(note, timeout, interval=0.1, what="the stage's waiting note")


def test_node_0_says_what_it_waits_for_then_refuses(spec_home, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_NODE_JOIN_WAIT_S", "1")
    settings = spec_home(tmp_path / "home", NODES_WAIT_S=4)
    settings.ensure_dirs()
    factory = _train_only_run(settings, "wait1")
    thread, out = _execute_in_thread(factory, settings, "wait1")
    note = _wait_note(factory, "wait1")
    host = socket.gethostname()
    assert note == (f"waiting for 2 workers on queue gpu: 1 joined (node 0 (worker gpu0@only on host {host})); "
                    "start 1 more worker(s) taking queue gpu, or cancel the run")
    thread.join(30)
    assert out["result"] == "failed"
    with factory() as s:
        run = runs.get_run(s, "wait1")
        stage = stages.get_stage(s, "wait1", "train")
        assert run.status == "failed" and stage.status == "failed" and stage.pid is None
        assert stage.error == ("only 1 of 2 workers on queue gpu joined within 4 s (SPEC_NODES_WAIT_S): start more "
                               "workers taking queue gpu (or ask for fewer nodes), then press Resume")
    # a joining message left over after the stage ended finds nothing to join (and waits
    # SPEC_NODE_JOIN_WAIT_S for node 0 to open an attempt before it says so)
    assert multinode.join(factory, settings, "wait1", worker="gpu0@late") == "skipped"


def test_a_cancel_ends_node_0_s_wait(spec_home, tmp_path, monkeypatch):
    settings = spec_home(tmp_path / "home", NODES_WAIT_S=600)
    settings.ensure_dirs()
    factory = _train_only_run(settings, "wait2", nnodes=3)
    thread, out = _execute_in_thread(factory, settings, "wait2")
    assert _wait_note(factory, "wait2").startswith("waiting for 3 workers on queue gpu: 1 joined")
    with factory() as s:
        runs.request_cancel(s, "wait2")
    thread.join(30)
    assert out["result"] == "cancelled"
    with factory() as s:
        assert runs.get_run(s, "wait2").status == "cancelled"
        assert s.query(StageNode).count() == 3  # the attempt's rows: node 0 and two never claimed


# ------------------------------------------------------------------ several verifier URLs


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's hook
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_each_verifier_url_is_checked_and_the_dead_one_named(spec_home, tmp_path, tiny_llama):
    settings = spec_home(tmp_path / "home")
    settings.ensure_dirs()
    good = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=good.serve_forever, daemon=True).start()
    # The dead server: a socket bound to a port but never listening. The port stays ours, so
    # nothing else can answer there, and the kernel refuses every connection to it at once
    # (a closed port could be taken by another process meanwhile).
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    good_url, dead_url = f"http://127.0.0.1:{good.server_port}", f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        raw = {"name": "two servers", "model": str(local_model(settings, tiny_llama)), "dataset": "sharegpt",
               "seq_length": 64, "max_samples": 8, "draft_vocab_size": 64, "mode": "online", "gpus": 0,
               "vllm_endpoint": f"{good_url}\n{dead_url}\n"}
        spec, errors = validate_spec(raw, settings, check_endpoint=endpoint_error)
        assert spec is None and set(errors) == {"vllm_endpoint"}
        assert errors["vllm_endpoint"].startswith(f"1 of 2 servers do not answer: cannot reach {dead_url}/health "
                                                  "(connection refused)")
        assert good_url + "/" not in errors["vllm_endpoint"] and f"{good_url}/health" not in errors["vllm_endpoint"]
        raw["vllm_endpoint"] = f"{good_url}\n{good_url.replace('127.0.0.1', 'localhost')}"
        spec, errors = validate_spec(raw, settings, check_endpoint=endpoint_error)
        assert errors == {} and spec.vllm_endpoints == [good_url, good_url.replace("127.0.0.1", "localhost")]
    finally:
        good.shutdown()
        good.server_close()
        dead.close()


def test_a_bad_url_among_several_is_named():
    _, errors = RunSettings.errors_of({"name": "n", "model": "m", "dataset": "sharegpt", "mode": "online",
                                       "vllm_endpoint": "http://a:8000\nhttp//b:8000"})
    assert "'http//b:8000' is not an http(s)://host:port URL" in errors["vllm_endpoint"]


def test_the_train_stage_carries_every_verifier_url(tmp_path):
    urls = ["http://hs-a:8000", "http://hs-b:8001"]
    spec = RunSettings(name="n", model="org/m", dataset="sharegpt", mode="hybrid", gpus=0,
                       vllm_endpoint="\n".join(urls))
    argv = stage_argv(spec, "train", StagePaths(tmp_path), python="/py")
    assert argv[:4] == ["/py", "-m", "speculators", "train"] and argv[4] == "--config"
    # read back as `speculators train --config FILE` reads it
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    add_config_option(parser)
    cfg = config_from_args(parse_args(parser, argv[4:]))
    assert cfg.vllm_endpoints == urls and cfg.on_generate == "cache"
    assert Path(argv[5]).is_file()
