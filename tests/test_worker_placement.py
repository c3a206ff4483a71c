"""Runs are placed by the GPUs they ask for: a run's stage messages go to `gpu-x<n>` when it
asks for n > 1 GPUs, a worker takes the queues up to its own GPU count (SPEC_MAX_GPUS), and
the reconciler looks for a run's message in that run's queue. The broker is Redis (the one
on 127.0.0.1, its own namespace per test)."""

from __future__ import annotations

import os
import uuid

import redis

from runstore import open_store, runs
from worker.celery_app import make_celery, worker_gpu_queues
from worker.dispatch import flush_outbox
from worker.reconcile import queue_size, reconcile

TEST_REDIS = os.environ.get("SPEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def test_worker_queues_cover_its_gpu_count():
    assert worker_gpu_queues(0) == worker_gpu_queues(1) == ["gpu"]
    assert worker_gpu_queues(4) == ["gpu", "gpu-x2", "gpu-x3", "gpu-x4"]


def test_runs_go_to_the_queue_of_their_gpu_count_and_the_reconciler_reads_it(tmp_path, spec_home):
    settings = spec_home(tmp_path / "home", BROKER_URL=TEST_REDIS, BROKER_NAMESPACE=f"t-{uuid.uuid4().hex[:8]}")
    app = make_celery(settings)
    client = redis.Redis.from_url(TEST_REDIS)
    prefix = app.conf.broker_transport_options["global_keyprefix"]
    factory = open_store(settings.db_url)
    try:
        with factory() as s:
            for run_id, gpus in (("cpu", 0), ("one", 1), ("two", 2), ("four", 4)):
                runs.create_run(s, run_id=run_id, name=run_id, spec={"mode": "offline", "gpus": gpus},
                                stages=["prepare"], work_dir=f"/w/{run_id}")
        assert flush_outbox(factory, app) == (4, None)
        assert {q: client.llen(prefix + q) for q in ("gpu", "gpu-x2", "gpu-x3", "gpu-x4")} == {
            "gpu": 2, "gpu-x2": 1, "gpu-x3": 0, "gpu-x4": 1}
        # every run's message waits in its own queue: nothing is due, even with `gpu` emptied
        client.delete(prefix + "gpu")
        assert queue_size(app, "gpu") == 0
        assert sorted(reconcile(factory, app, grace_s=0)) == ["cpu", "one"]  # those two were lost
        assert client.llen(prefix + "gpu") == 0  # queued again through the outbox (not yet sent)
        assert flush_outbox(factory, app) == (2, None)
        assert client.llen(prefix + "gpu") == 2 and client.llen(prefix + "gpu-x4") == 1
    finally:
        for key in client.scan_iter(prefix + "*"):
            client.delete(key)


def test_a_stage_worker_takes_the_queues_up_to_its_gpus(tmp_path, spec_home):
    """The worker's own start-up signal (celeryd_after_setup) adds `gpu-x2`.. `gpu-x<n>` to a
    `-Q gpu` worker with n GPUs; the vLLM controller's queues are left alone."""
    from celery import signals

    spec_home(tmp_path / "home", BROKER_URL=TEST_REDIS, MAX_GPUS=3)
    for queues, expected in ((["gpu"], {"gpu", "gpu-x2", "gpu-x3"}), (["vllm"], {"vllm"})):
        app = make_celery()
        worker = app.Worker(queues=queues, pool="solo", concurrency=1, hostname=f"t{queues[0]}@h")
        signals.celeryd_after_setup.send(sender=worker.hostname, instance=worker, conf=app.conf)
        assert set(app.amqp.queues.consume_from) == expected
