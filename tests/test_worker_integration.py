"""A real Redis and real Celery worker processes running tiny CPU runs end to end:
every stage runs, a worker killed mid-training resumes from its last checkpoint with no
metric row lost or duplicated, and cancelling stops the stage's process."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis

from runstore import metrics, runs, stages
from runstore.settings import Settings
from speculators.config.stages import StagePaths
from worker.spec import validate_spec

from tests.support.stage_gate import StageGate
from tests.support.store import local_model, submit_run
from tests.support.wait import wait_for
from tests.support.workers import run_with_stages, start_worker, worker_env

pytestmark = pytest.mark.slow
TEST_REDIS = os.environ.get("SPEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture(scope="module")
def redis_url():
    client = redis.Redis.from_url(TEST_REDIS, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"these tests need Redis at {TEST_REDIS} (set SPEC_TEST_REDIS_URL)")
    client.flushdb()
    yield TEST_REDIS
    client.flushdb()


@pytest.fixture(scope="module")
def env(tmp_path_factory, redis_url, tiny_llama):
    home = tmp_path_factory.mktemp("home")
    env = worker_env(home, redis_url)
    for k in ("SPEC_HOME", "SPEC_BROKER_URL", "SPEC_MAX_GPUS"):
        os.environ[k] = env[k]
    yield env
    for k in ("SPEC_HOME", "SPEC_BROKER_URL", "SPEC_MAX_GPUS"):
        os.environ.pop(k, None)


def _submit(env, model, **over):
    settings = Settings.from_env()
    settings.ensure_dirs()
    raw = {"name": "tiny; echo $(id) > pwned", "model": "", "dataset": "sharegpt", "seq_length": 64,
           "max_samples": 12, "layer_ids": "", "draft_vocab_size": 64, "epochs": 2, "lr": "3e-3",
           "ttt_steps": 2, "num_layers": 1, "mode": "offline", "gpus": 0}
    raw.update(over)
    raw["model"] = str(local_model(settings, model))  # the form accepts local models under the models root only
    spec, errors = validate_spec(raw, settings)
    assert errors == {}
    return submit_run(settings, spec)


def test_run_survives_worker_kill_and_resumes(env, tiny_llama, tmp_path):
    factory, run_id = _submit(env, tiny_llama, epochs=16, max_samples=24)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log_path=log)
    try:
        # wait until training has written a checkpoint and is still going
        def mid_train():
            with factory() as s:
                return len(metrics.checkpoints(s, run_id)) >= 2 and run_with_stages(factory, run_id)[0].status == "running"
        wait_for(mid_train, 600, what="two checkpoints")
        with factory() as s:
            trainer_pid = stages.get_stage(s, run_id, "train").pid
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        # the trainer dies with its worker (no orphan keeps writing)
        wait_for(lambda: not os.path.exists(f"/proc/{trainer_pid}") or
                 open(f"/proc/{trainer_pid}/stat").read().split()[2] == "Z", 30, what="trainer exit")
        run, by_stage = run_with_stages(factory, run_id)
        assert by_stage["train"].status == "running"  # nobody has noticed yet

        worker = start_worker(env, log_path=log)  # same name: recovery resumes the run
        wait_for(lambda: run_with_stages(factory, run_id)[0].status in ("succeeded", "failed"), 600, what="run end")
        run, by_stage = run_with_stages(factory, run_id)
        assert run.status == "succeeded", (run.error, open(by_stage["train"].log_path).read()[-3000:])
        assert all(x.status == "succeeded" for x in by_stage.values())
        assert by_stage["train"].attempts == 2 and by_stage["prepare"].attempts == 1

        paths = StagePaths(__import__("pathlib").Path(run.work_dir))
        records = [json.loads(line) for line in paths.metrics.read_text().splitlines() if line.strip()]
        starts = [r for r in records if r["type"] == "start"]
        assert len(starts) == 2 and starts[0]["resumed_from"] is None and starts[1]["resumed_from"] is not None
        total = starts[0]["total_steps"]
        with factory() as s:
            train = metrics.step_records(s, run_id, kind="train")
            val = metrics.step_records(s, run_id, kind="val")
            ckpts = metrics.checkpoints(s, run_id)
        assert [m.step for m in train] == list(range(1, total + 1))  # none lost, none twice
        assert len(val) == 16 and len({m.step for m in val}) == 16
        assert [c.epoch for c in ckpts] == list(range(16))
        assert sum(c.is_best for c in ckpts) == 1
        assert not (paths.work_dir / "pwned").exists()
        # the run name reached the trainer as one argument
        assert starts[0]["run_name"] == "tiny; echo $(id) > pwned"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


def test_cancel_stops_the_running_stage(env, tiny_llama, tmp_path):
    """Prepare's process is held at its start (tests.support.stage_gate), so the cancel lands
    while it runs however fast the machine finishes a prepare; the worker stops it."""
    factory, run_id = _submit(env, tiny_llama)
    gate = StageGate(tmp_path / "gate", "prepare-data")
    worker = start_worker(gate.env(env), log_path=tmp_path / "worker.log")
    try:
        pid = wait_for(gate.held, 120, what="prepare running (held at its start)")
        wait_for(lambda: run_with_stages(factory, run_id)[1]["prepare"].pid == pid, 60, what="the stage's pid")
        with factory() as s:
            runs.request_cancel(s, run_id)
        wait_for(lambda: run_with_stages(factory, run_id)[0].status == "cancelled", 60, what="cancelled")
        _, by_stage = run_with_stages(factory, run_id)
        assert by_stage["prepare"].status == "cancelled"
        assert all(by_stage[n].status == "cancelled" and by_stage[n].started_at is None
                   for n in ("vocab", "datagen", "train"))
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        # and it can be resumed afterwards from the cancelled stage
        with factory() as s:
            assert runs.resume_run(s, run_id) == ["prepare", "vocab", "datagen", "train"]
        with factory() as s:
            runs.request_cancel(s, run_id)
    finally:
        gate.release()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
