"""Beyond one machine: two worker hosts in network namespaces of their own, each with its own
home, working folder and host name and no SQLite, reaching the main host's PostgreSQL run
store and Redis broker only through their veth addresses, and sharing one artifact root (a
temp folder at the same path on both: the NFS stand-in). The main side submits two runs at
once the dashboard's way (run store + outbox); both finish, each host runs stages, every
metric row is stored exactly once, and that holds through a broker kill and a database kill
while a stage trains. A two-node torchrun (c10d rendezvous across the namespaces, gloo)
gives the losses of one process taking the same two batches per step.

Runs as root (CI does); skipped only where `ip netns` cannot be used (tests.support.netns)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from runstore import metrics, open_store, runs
from runstore.db import retry_unreachable
from runstore.models import OutboxMessage
from runstore.settings import Settings
from speculators.config.stages import StagePaths
from speculators.train.metrics_stream import read_metrics
from worker.celery_app import make_celery
from worker.dispatch import flush_outbox
from worker.local import worker_argv
from worker.spec import validate_spec

from tests.support.netns import Hosts, OwnPostgres, OwnRedis, netns_problem, stop_process
from tests.support.store import local_model, submit_run
from tests.support.synthetic import write_synthetic_hidden_states
from tests.support.train_helpers import run_train_cli
from tests.support.wait import wait_for
from tests.support.workers import worker_env

pytestmark = pytest.mark.slow
NAMESPACE = "spec-netns-test"  # one broker namespace for the main side and both hosts


@pytest.fixture(scope="module")
def hosts():
    why = netns_problem()
    if why:
        pytest.skip(why)
    made = Hosts()
    try:
        made.up()
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def services(hosts):
    """The main host's PostgreSQL and Redis, on its two veth addresses only."""
    pg = redis = None
    try:
        pg = OwnPostgres([hosts.main_for_a, hosts.main_for_b], f"{hosts.net}.0/24")
        redis = OwnRedis([hosts.main_for_a, hosts.main_for_b])
        yield pg, redis
    finally:
        if redis is not None:
            redis.close()
        if pg is not None:
            pg.close()


def _host_env(root: Path, shared: Path, db_url: str, broker_url: str) -> dict[str, str]:
    """A joining host's settings (compose.worker.yaml's): its own HOME and SPEC_HOME, the
    shared root's folders, SPEC_REQUIRE_SHARED_ROOT, the main host's database and broker."""
    home = root / "home"
    home.mkdir(parents=True)
    return worker_env(home, broker_url, HOME=str(home), SPEC_DB_URL=db_url, SPEC_BROKER_NAMESPACE=NAMESPACE,
                      SPEC_RUNS_ROOT=str(shared / "runs"), SPEC_DATA_ROOT=str(shared / "data"),
                      SPEC_MODELS_ROOT=str(shared / "models"), SPEC_REQUIRE_SHARED_ROOT="1",
                      SPEC_RECONCILE_EVERY_S="5")


def _runs_done(factory, run_ids):
    def check():
        with factory() as s:
            return all(runs.get_run(s, r).status in ("succeeded", "failed", "cancelled") for r in run_ids)
    return check


def _stages(factory, run_id):
    with factory() as s:
        run = runs.get_run(s, run_id)
        s.refresh(run)
        return {x.name: x for x in run.stages}


def _utc(dt) -> float:
    return dt.replace(tzinfo=timezone.utc).timestamp()  # the store keeps naive UTC


def _jsonl_train_steps(path: Path) -> int:
    return sum(1 for r in read_metrics(path) if r["type"] == "train") if path.exists() else 0


class _Host:
    """One worker host: `start()` runs this project's GPU worker command (worker.local's
    argv, `-n gpu0@%h`) inside the namespace under the host's own name, cwd and home."""

    def __init__(self, hosts: Hosts, name: str, ns: str, via: str, root: Path, shared: Path, pg, redis) -> None:
        self.hosts, self.name, self.ns, self.root = hosts, name, ns, root
        self.env = _host_env(root, shared, pg.url(via), redis.url(via))
        (root / "work").mkdir()
        self.log = root / "worker.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.hosts.argv(self.ns, worker_argv("gpu", "gpu0@%h", False),
                                                         hostname=self.name),
                                         env=self.env, cwd=self.root / "work", stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: f"gpu0@{self.name} ready." in self.log.read_text(), 120, what=f"the worker on {self.name}")


def test_two_runs_on_two_hosts_survive_broker_and_database_restarts(hosts, services, tiny_llama, tmp_path):
    pg, redis = services
    shared = tmp_path / "shared"
    main = Settings(home=tmp_path / "main" / "home", db_url=pg.url(hosts.main_for_a),
                    broker_url=redis.url(hosts.main_for_a), broker_namespace=NAMESPACE,
                    runs_root=shared / "runs", data_root=shared / "data", models_root=shared / "models")
    main.ensure_dirs()  # the main host marks the shared root; the hosts only check for it
    factory = open_store(main.db_url)
    a = _Host(hosts, "host-a", hosts.ns_a, hosts.main_for_a, tmp_path / "host-a", shared, pg, redis)
    b = _Host(hosts, "host-b", hosts.ns_b, hosts.main_for_b, tmp_path / "host-b", shared, pg, redis)
    try:
        a.start()
        # two runs at once, the dashboard's way: rows + outbox messages, then one outbox flush
        model = str(local_model(main, tiny_llama))
        base = {"name": "", "model": model, "dataset": "sharegpt", "seq_length": 64, "layer_ids": "",
                "draft_vocab_size": 64, "lr": "3e-3", "ttt_steps": 2, "num_layers": 1, "mode": "offline", "gpus": 0}
        run_ids = []
        for name, over in (("x", {"epochs": 10, "max_samples": 24}), ("y", {"epochs": 6, "max_samples": 16})):
            spec, errors = validate_spec({**base, "name": name, **over}, main)
            assert errors == {}
            run_ids.append(submit_run(main, spec, send=False)[1])
        assert flush_outbox(factory, make_celery(main)) == (2, None)
        x = run_ids[0]

        # host B joins once A has finished run x's first stage: A has taken y's prepare (the
        # older message), so x's next stage goes to B, which reads what A wrote on the shared root
        wait_for(lambda: _stages(factory, x)["prepare"].status == "succeeded", 120, what="x prepared on A")
        b.start()

        # the broker is killed while both hosts run a stage, and kept down until a stage ends:
        # that stage's successor waits in the outbox and goes out once Redis is back
        wait_for(lambda: sum(st.status == "running" for r in run_ids for st in _stages(factory, r).values()) == 2,
                 60, interval=0.1, what="a stage running on each host")
        redis.kill()
        broker_down = time.time()
        wait_for(lambda: any(st.finished_at and _utc(st.finished_at) > broker_down
                             for r in run_ids for st in _stages(factory, r).values()), 120, interval=0.2,
                 what="a stage ending while the broker is down")

        def kept():  # the finished stage's worker tried to send its successor and kept it
            with factory() as s:
                return [m for m in s.scalars(select(OutboxMessage))
                        if m.sent_at is None and m.last_error and "Redis" in m.last_error]
        wait_for(kept, 120, interval=0.2, what="a successor kept in the outbox while the broker is down")
        redis.start()
        broker_up = time.time()

        # a train stage past its second step: the database is killed and started again
        def training():
            for run_id in run_ids:
                train = _stages(factory, run_id)["train"]
                if train.status == "running" and (train.current_step or 0) >= 2:
                    return run_id
            return None
        victim = wait_for(training, 300, interval=0.2, what="a train stage at step 2")
        jsonl = StagePaths(shared / "runs" / victim).metrics
        pg.kill()
        db_down = time.time()
        seen = _jsonl_train_steps(jsonl)
        wait_for(lambda: _jsonl_train_steps(jsonl) >= seen + 2, 120, interval=0.1,
                 what="two steps trained while the database is down")
        pg.start()
        db_up = time.time()

        done = _runs_done(factory, run_ids)  # the dashboard's reads wait through an outage too
        wait_for(lambda: retry_unreachable(done, main.db_url, first_s=0.2, max_s=1.0), 300, interval=1.0,
                 what="both runs end")
    finally:
        for host in (a, b):
            stop_process(host.proc, 20)
    worker_logs = {h.name: h.log.read_text() for h in (a, b)}

    by_host: dict[str, list[tuple[str, str]]] = {"host-a": [], "host-b": []}
    crossed: list[tuple[str, str]] = []
    with factory() as s:
        for run_id in run_ids:
            run = runs.get_run(s, run_id)
            s.refresh(run)
            assert run.status == "succeeded", (run.error, worker_logs)
            order = sorted(run.stages, key=lambda st: st.position)
            crossed += [(run_id, b.name) for a, b in zip(order, order[1:]) if (a.host, b.host) == ("host-a", "host-b")]
            for stage in run.stages:
                # each stage ran once, on the host its worker is named after, logging to the shared root
                assert stage.status == "succeeded" and stage.attempts == 1, (stage.name, stage.attempts)
                assert stage.worker == f"gpu0@{stage.host}", (stage.worker, stage.host)
                by_host[stage.host].append((run_id, stage.name))
                assert Path(stage.log_path).is_relative_to(shared / "runs" / run_id)
            # every metric row once: the trainer's own metrics.jsonl is the independent record
            records = read_metrics(StagePaths(Path(run.work_dir)).metrics)
            starts = [r for r in records if r["type"] == "start"]
            assert len(starts) == 1  # trained once, never restarted
            assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, starts[0]["total_steps"] + 1))
            for kind in ("train", "val"):
                own = [(r["step"], r["metrics"]["loss"]) for r in records if r["type"] == kind]
                stored = [(m.step, m.metrics["loss"]) for m in metrics.step_records(s, run_id, kind=kind)]
                assert stored == own and own, (run_id, kind)
            assert [c.epoch for c in metrics.checkpoints(s, run_id)] == \
                [r["epoch"] for r in records if r["type"] == "checkpoint"]
        # the outage spanned a stage end: its successor's message failed to go out, then went
        held = [m for m in s.scalars(select(OutboxMessage)) if m.last_error and "Redis" in m.last_error]
        assert held and all(m.sent_at is not None and _utc(m.sent_at) > broker_up - 1 for m in held), \
            [(m.last_error, m.sent_at) for m in held]
        train = _stages(factory, victim)["train"]
        assert _utc(train.started_at) < db_down and _utc(train.finished_at) > db_up
    # both hosts ran stages, and a run moved from A to B: B, joining while both runs were under
    # way, took the next stage of a run A had started (x's vocab, unless B was slow to start
    # and A had taken it) and read A's outputs on the shared root
    assert by_host["host-a"] and by_host["host-b"], by_host
    assert crossed, by_host
    # what the trainer logged while the database was down reached the store afterwards
    during = [r for r in read_metrics(StagePaths(shared / "runs" / victim).metrics)
              if r["type"] == "train" and db_down < r["ts"] < db_up]
    assert len(during) >= 2
    # the broker restart may hand the messages of the stages running then out again (the solo
    # pool acks a message when its stage ends, worker.celery_app; whether kombu restores them
    # depends on when each worker's connection notices the outage, so it is not asserted here:
    # tests/test_runstore_multihost.py drives that copy directly). Any copy ran nothing: every
    # stage above has one attempt, and no copy ran its stage to success a second time.
    received = re.findall(r"Task worker\.tasks\.run_stage\[([0-9a-f-]+)\] received", "".join(worker_logs.values()))
    for task_id in {t for t in received if received.count(t) > 1}:
        ended = re.findall(rf"Task worker\.tasks\.run_stage\[{task_id}\] succeeded in [0-9.]+s: '(\w+)'",
                           "".join(worker_logs.values()))
        assert ended.count("succeeded") <= 1, (task_id, ended)
    # the worker of that stage waited for the database instead of failing
    assert any("is unreachable" in text and "retrying in" in text for text in worker_logs.values())
    for host in (a, b):  # no SQLite anywhere on a host, nothing of the runs in its home
        assert not list(host.root.rglob("*.sqlite*")), host.name
        assert not (host.root / "home" / "runs").exists()


def _node(hosts: Hosts, ns: str, own_addr: str, ifname: str, host_store: bool, args: list[str], log: Path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun not found next to the interpreter"
    # the endpoint's address is this test's, not what the machine's host name resolves to:
    # say which node hosts the rendezvous store (is_host), which address each node is reached
    # on (--local-addr) and which interface gloo uses
    argv = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{hosts.a_to_b}:29400", "--rdzv-id", "netns-two-nodes",
            "--rdzv-conf", f"is_host={int(host_store)}", "--local-addr", own_addr,
            "-m", "speculators.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": ifname,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))}
    out = open(log, "wb")  # noqa: SIM115 - closed by the caller's wait
    return subprocess.Popen(hosts.argv(ns, argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True), out


def test_two_node_training_across_namespaces_matches_one_process(hosts, tiny_llama, tmp_path):
    shared = tmp_path / "shared"
    data = write_synthetic_hidden_states(tiny_llama, shared / "hs", num_samples=12, seq_len=40)
    common = ["--verifier-name-or-path", str(tiny_llama), "--data-path", str(data), "--epochs", "2",
              "--lr", "3e-3", "--total-seq-len", "96", "--ttt-steps", "2", "--num-layers", "1",
              "--log-freq", "1000", "--train-data-ratio", "0.75", "--eval-prompts", "0"]
    two = shared / "two-nodes"
    nodes = []
    try:
        nodes = [_node(hosts, hosts.ns_a, hosts.a_to_b, hosts.if_ab, True, [*common, "--save-path", str(two)],
                       tmp_path / "node-a.log"),
                 _node(hosts, hosts.ns_b, hosts.b_to_a, hosts.if_ba, False, [*common, "--save-path", str(two)],
                       tmp_path / "node-b.log")]
        codes = [proc.wait(400) for proc, _ in nodes]
    finally:
        for proc, out in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            out.close()
    logs = {n: (tmp_path / f"node-{n}.log").read_text()[-3000:] for n in "ab"}
    assert codes == [0, 0], logs

    single = run_train_cli([*common, "--batches-per-step", "2", "--save-path", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    starts = [r for r in read_metrics(two / "metrics.jsonl") if r["type"] == "start"]
    single_start = next(r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["type"] == "start")
    assert len(starts) == 1 and starts[0]["total_steps"] == single_start["total_steps"]
    d = {r["step"]: r["metrics"] for r in read_metrics(two / "metrics.jsonl") if r["type"] == "train"}
    s = {r["step"]: r["metrics"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["type"] == "train"}
    assert len(d) >= 4 and d.keys() == s.keys()
    for step in d:
        for key in ("loss", "loss_0", "loss_1"):
            assert d[step][key] == pytest.approx(s[step][key], rel=1e-4, abs=1e-6), (step, key)
    print(json.dumps({"steps": len(d), "final_loss_two_nodes": d[max(d)]["loss"],
                      "final_loss_one_process": s[max(s)]["loss"]}))
