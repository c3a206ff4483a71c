"""A run asking for 2 nodes, on two real Celery workers (two node names, one Redis, one SQLite
store, SPEC_WORKER_ADDRESS=127.0.0.1 standing in for two hosts' addresses): the train stage
waits, saying so, while only one worker has joined, trains under torchrun's c10d rendezvous
across both once the second starts (gloo, one process per node), and its per-step losses
equal one process's with the same global batch (`--batches-per-step 2`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from runstore import metrics, nodes
from runstore.settings import Settings
from speculators.config.stages import StagePaths
from speculators.train.metrics_stream import read_metrics
from worker.spec import validate_spec

from tests.support.store import local_model, submit_run
from tests.support.wait import wait_for
from tests.support.workers import run_with_stages, start_worker, worker_env

pytestmark = pytest.mark.slow
TEST_REDIS = os.environ.get("SPEC_TEST_MULTINODE_REDIS_URL", "redis://127.0.0.1:6379/7")


@pytest.fixture()
def env(tmp_path, monkeypatch):
    client = redis.Redis.from_url(TEST_REDIS, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"this test needs Redis at {TEST_REDIS} (set SPEC_TEST_MULTINODE_REDIS_URL)")
    namespace = f"mn-{uuid.uuid4().hex[:8]}"
    env = worker_env(tmp_path / "home", TEST_REDIS, SPEC_BROKER_NAMESPACE=namespace,
                     SPEC_WORKER_ADDRESS="127.0.0.1", SPEC_NODE_STALE_S="20")
    for k in ("SPEC_HOME", "SPEC_BROKER_URL", "SPEC_MAX_GPUS", "SPEC_BROKER_NAMESPACE"):
        monkeypatch.setenv(k, env[k])
    yield env
    for key in client.scan_iter(namespace + ":*"):
        client.delete(key)


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def test_two_node_run_waits_for_its_second_worker_then_matches_one_process(env, tiny_llama, tmp_path):
    settings = Settings.from_env()
    settings.ensure_dirs()
    raw = {"name": "two nodes", "model": str(local_model(settings, tiny_llama)), "dataset": "sharegpt",
           "seq_length": 64, "max_samples": 16, "draft_vocab_size": 64, "epochs": 2, "lr": "3e-3", "ttt_steps": 2,
           "num_layers": 1, "mode": "offline", "gpus": 0, "nodes": 2, "eval_prompts": 0}
    spec, errors = validate_spec(raw, settings)
    assert errors == {}
    factory, run_id = submit_run(settings, spec)
    a = start_worker(env, name="gpu0@node-a", log_path=tmp_path / "a.log")
    b = None
    try:
        # one worker: it runs the one-node stages, then holds the train stage as node 0, waiting
        def waiting():
            _, by = run_with_stages(factory, run_id)
            train = by["train"]
            return train.status == "running" and train.error and "waiting for 2 workers" in train.error and train
        train = wait_for(waiting, 600, what="the train stage waiting for a second worker")
        assert train.error.startswith("waiting for 2 workers on queue gpu: 1 joined (node 0 (worker gpu0@node-a")
        assert train.pid is None  # nothing started yet
        b = start_worker(env, name="gpu0@node-b", log_path=tmp_path / "b.log")
        wait_for(lambda: run_with_stages(factory, run_id)[0].status in ("succeeded", "failed"), 600, what="run end")
        run, by = run_with_stages(factory, run_id)
        paths = StagePaths(Path(run.work_dir))
        assert run.status == "succeeded", (run.error, paths.log("train").read_text()[-3000:])
        def node_rows():  # node 1's worker records its end just after node 0's
            with factory() as s:
                rows = nodes.nodes_of(s, by["train"].id, by["train"].attempts)
            return rows if all(r.status in ("ended", "failed") for r in rows) else None
        rows = wait_for(node_rows, 60, what="both nodes ended")
        assert [(r.node_rank, r.worker, r.status) for r in rows] == [
            (0, "gpu0@node-a", "ended"), (1, "gpu0@node-b", "ended")]
        assert rows[0].address.startswith("127.0.0.1:")
        # each node ran torchrun with the c10d rendezvous at node 0's address
        for log in (paths.log("train"), paths.logs / "train.node1.log"):
            text = log.read_text()
            assert f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint {rows[0].address}" in text, text[-2000:]
    finally:
        _stop(a)
        if b is not None:
            _stop(b)

    records = read_metrics(paths.metrics)
    start = next(r for r in records if r["type"] == "start")
    dist = {r["step"]: r["metrics"] for r in records if r["type"] == "train"}
    # the reference: one process, the stage's own settings file, two batches per optimizer step
    single = tmp_path / "single"
    ref = subprocess.run([sys.executable, "-m", "speculators", "train", "--config", str(paths.settings("train")),
                          "--batches-per-step", "2", "--save-path", str(single)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_records = read_metrics(single / "metrics.jsonl")
    ref_start = next(r for r in ref_records if r["type"] == "start")
    one = {r["step"]: r["metrics"] for r in ref_records if r["type"] == "train"}
    assert start["total_steps"] == ref_start["total_steps"] and len(dist) == start["total_steps"] >= 4
    assert dist.keys() == one.keys()
    for step in dist:
        for key in ("loss", "loss_0", "loss_1", "full_acc_0", "full_acc_1"):
            assert dist[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
    with factory() as s:
        stored = {m.step: m.metrics["loss"] for m in metrics.step_records(s, run_id, kind="train")}
    assert stored == {step: m["loss"] for step, m in dist.items()}  # rank 0's records, each once
    print(f"2 nodes vs 1 process, {len(dist)} steps: final loss {dist[max(dist)]['loss']:.6f} "
          f"vs {one[max(one)]['loss']:.6f}")
