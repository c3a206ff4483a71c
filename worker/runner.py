"""Run one stage of a run: start its command, stream its metrics into SQLite, honour cancel.

Called by the Celery task in `worker.tasks`; kept free of Celery so it tests alone.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import requests
from sqlalchemy.orm import Session, sessionmaker

from runstore import deployments, metrics, nodes, runs, stages
from runstore.db import retry_unreachable
from runstore.models import ACTIVE_RUN
from runstore.settings import Settings
from speculators import process
from speculators.config.run import RunSettings
from speculators.config.stages import StagePaths
from speculators.metric_records import ProgressRecord, parse_record
from speculators.progress import ENV as PROGRESS_ENV
from worker import multinode, procs
from worker.pipeline import stage_argv
from worker.shared_root import shared_root_problem
from worker.tail import JsonlTail

HEARTBEAT_S = 1.0


def execute_stage(factory: sessionmaker[Session], settings: Settings, run_id: str, stage_name: str,
                  *, worker: str, dispatch=None) -> str:
    """Returns succeeded | failed | cancelled | skipped | blocked | stale."""
    with factory() as s:
        run = runs.get_run(s, run_id)
        if run is None:
            return "skipped"
        s.refresh(run)
        if run.cancel_requested or run.status == "cancelled":
            return "cancelled"
        stage = stages.get_stage(s, run_id, stage_name)
        if stage is None or stage.status == "succeeded":
            return "skipped"
        if run.status not in ACTIVE_RUN:
            # a message delivered again for a run that has ended (failed, interrupted): the
            # broker hands a running stage's message out again when its connection drops
            # (worker.celery_app); only Resume, which queues the run anew, runs it again
            return "stale"
        if stage.worker != worker and stages.any_live(s, run_id, stage_id=stage.id):
            return "blocked"  # a duplicate message; the stage runs elsewhere
        if any(x.status != "succeeded" for x in run.stages if x.position < stage.position):
            return "blocked"
        spec = RunSettings.from_dict(run.spec)
        multi = stage_name == "train" and spec.nodes > 1  # this worker is node 0 (worker.multinode)
        paths = StagePaths(Path(run.work_dir))
        log_path = paths.log(stage_name)
        host = socket.gethostname()
        stage = stages.start_stage(s, run_id, stage_name, worker=worker, log_path=str(log_path), host=host)
        if stage is None:
            return "blocked"  # another worker claimed it first
        stage_id = stage.id
        attempt = stage.attempts
        first = stage.position == min(x.position for x in run.stages)
        # a joining host without the shared root: fail now, before anything is written (the
        # log included: it would land on the empty mount point)
        missing = shared_root_problem(settings, run.work_dir, host)
        if missing:
            stages.finish_stage(s, run_id, stage_name, "failed", missing)
            return "failed"

    if stage_name == "verifier":
        return _ensure_verifier(factory, settings, run_id, spec, paths, stage_id, dispatch)

    if spec.online and spec.vllm_endpoint and first:
        # an online run's own vLLM URLs are needed later (verifier, train): fail now, not after
        # the data stages and the verifier stage's wait
        why = next(filter(None, map(_endpoint_down, spec.vllm_endpoints)), None)
        if why:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"error: {why}\n")
            with factory() as s:
                stages.finish_stage(s, run_id, stage_name, "failed", why)
            return "failed"

    rendezvous = node_id = None
    # node 0 of a multi-node stage: every store access retried through an outage, the other
    # nodes given time to beat again after one (worker.multinode.JoinerStore)
    store = multinode.JoinerStore(factory, settings.db_url) if multi else storing(factory, settings.db_url)
    if multi:
        from worker.celery_app import gpu_queue

        outcome, value = multinode.gather(store, settings, run_id=run_id, stage_id=stage_id, attempt=attempt,
                                          nnodes=spec.nodes, worker=worker, host=host, queue=gpu_queue(spec.gpus))
        if outcome != "ready":
            cancelled = outcome == "cancelled"
            status, why = ("cancelled", "cancelled by the user") if cancelled else ("failed", str(value))
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{'error: ' if status == 'failed' else ''}{why}\n")
            store(lambda s: stages.finish_stage(s, run_id, stage_name, status, why))
            return status
        rendezvous, node_id = value

    try:
        verifier_url = _verifier_url(factory, run_id) if spec.mode in ("online", "hybrid") else None
        argv = stage_argv(spec, stage_name, paths, verifier_url=verifier_url, rendezvous=rendezvous)
    except ValueError as exc:
        with factory() as s:
            stages.finish_stage(s, run_id, stage_name, "failed", str(exc))
        return "failed"

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== {stage_name} attempt {attempt} on {worker} at {datetime.now().isoformat(timespec='seconds')}\n")
        fh.write("$ " + shlex.join(argv) + "\n")
    env = procs.child_env(settings.train_threads)
    progress_path = paths.logs / f"{stage_name}.progress.jsonl"
    progress_path.unlink(missing_ok=True)  # this attempt's lines only
    env[PROGRESS_ENV] = str(progress_path)
    try:
        paths.work_dir.mkdir(parents=True, exist_ok=True)
        # the stage dies with this worker even when the worker is SIGKILLed
        proc = process.start(argv, log=log_path, cwd=paths.work_dir, env=env, lifeline=process.Lifeline.COMMAND)
    except OSError as exc:
        with factory() as s:
            stages.finish_stage(s, run_id, stage_name, "failed", f"could not start {argv[0]}: {exc}")
        return "failed"
    store(lambda s: stages.set_stage_pid(s, stage_id, proc.pid))

    tail = JsonlTail(paths.metrics) if stage_name == "train" else None
    check = None
    if node_id is not None:  # node 0 also beats its node row and watches the other nodes
        def check() -> str | None:
            store(lambda s: nodes.beat(s, node_id))
            return multinode.peer_problem(store, stage_id, attempt, 0)
    status, lost = _watch(store, run_id, stage_id, proc, tail, JsonlTail(progress_path), check=check)
    if node_id is not None:
        ended = status == "cancelled" or (status == "exited" and proc.returncode == 0)
        store(lambda s: nodes.end_node(s, node_id, nodes.ENDED if ended else nodes.FAILED,
                                       "cancelled by the user" if status == "cancelled" else lost))
    if status == "cancelled":
        store(lambda s: stages.finish_stage(s, run_id, stage_name, "cancelled", "cancelled by the user"))
        return "cancelled"
    rc = proc.returncode
    if status == "exited" and rc == 0:
        store(lambda s: stages.finish_stage(s, run_id, stage_name, "succeeded"))
        return "succeeded"
    if lost:
        error = lost
    else:
        error = procs.error_summary(log_path, rc)
        if node_id is not None:  # the trainers fail together: name the node that failed first
            error = multinode.failure_message(store, stage_id, attempt, error)
    store(lambda s: stages.finish_stage(s, run_id, stage_name, "failed", error))
    return "failed"


Store = Callable[[Callable[[Session], object]], object]


def storing(factory: sessionmaker[Session], url: str) -> Store:
    """`store(fn)`: fn(session) in a new session, repeated with backoff while the database does
    not answer (runstore.db.retry_unreachable). While a stage runs its process goes on through a
    database outage; the worker waits to record what it read (the metrics records it holds,
    the stage's end), so nothing is lost."""

    def store(fn: Callable[[Session], object]) -> object:
        def once() -> object:
            with factory() as s:
                return fn(s)

        return retry_unreachable(once, url)

    return store


def _watch(store: Store, run_id: str, stage_id: int, proc: process.Process, tail: JsonlTail | None,
           progress: JsonlTail | None = None, check: Callable[[], str | None] | None = None
           ) -> tuple[str, str | None]:
    """("exited", None) when the process ended, ("cancelled", None) on the user's cancel,
    ("lost", why) when `check` (run at each heartbeat) gave a reason to stop it."""
    last_beat = 0.0
    while True:
        rc = proc.poll()
        if tail is not None:
            records = tail.read_new()
            if records:
                store(lambda s: metrics.ingest_records(s, run_id, records, stage_id=stage_id))
        if progress is not None:
            last = next((r for r in map(parse_record, reversed(progress.read_new()))
                         if isinstance(r, ProgressRecord)), None)
            if last is not None:
                store(lambda s: stages.stage_progress(s, stage_id, last.done, last.total))
        if rc is not None:
            return "exited", None
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_S:
            last_beat = now
            cancelled = store(lambda s: stages.heartbeat(s, stage_id))
            why = None if cancelled or check is None else check()
            if cancelled or why:
                proc.stop(grace_s=10.0)
                if tail is not None:
                    rest = tail.read_new()
                    store(lambda s: metrics.ingest_records(s, run_id, rest, stage_id=stage_id))
                return ("cancelled", None) if cancelled else ("lost", why)
        time.sleep(0.25)


def _verifier_url(factory, run_id: str) -> str | None:
    with factory() as s:
        return verifier_url_in(s, run_id)


def verifier_url_in(s: Session, run_id: str) -> str | None:
    """The URL of the run's own verifier deployment while it is up, else None."""
    dep = deployments.latest_deployment(s, run_id, kind="verifier")
    return dep.endpoint if dep is not None and dep.status == "up" else None


def healthy(url: str, timeout: float = 2.0) -> bool:
    return probe_health(url, timeout)[0]


def probe_health(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, what the endpoint said): `HTTP 200`, `HTTP 503`, or the connection error."""
    try:
        code = requests.get(url.rstrip("/") + "/health", timeout=timeout).status_code
    except requests.ConnectionError as exc:
        text = str(exc)
        why = ("name not resolved" if "resolve" in text.lower() or "Name or service" in text
               else "connection refused" if "refused" in text.lower() else "cannot connect")
        return False, why
    except requests.Timeout:
        return False, f"no answer within {timeout:.0f} s"
    except requests.RequestException as exc:
        return False, type(exc).__name__
    return code == 200, f"HTTP {code}"


def _endpoint_down(url: str, tries: int = 3, pause_s: float = 1.0) -> str | None:
    """The failure message when a user's vLLM URL accepts no connection (a few tries a second
    apart, so a blip passes), or None. Any HTTP answer counts as reachable (503 while loading)."""
    said = ""
    for i in range(tries):
        ok, said = probe_health(url)
        if ok or said.startswith("HTTP"):
            return None
        if i + 1 < tries:
            time.sleep(pause_s)
    return (f"the vLLM endpoint {url.rstrip('/')} is unreachable ({said}), checked before the first stage: "
            "start vLLM there or fix the URL, then press Resume")


def unreachable_limit_s() -> float:
    """How long a user's vLLM URL may refuse connections before the run fails (it answers at
    once once vLLM is listening, even while it loads the model)."""
    return float(os.environ.get("SPEC_ENDPOINT_UNREACHABLE_S", "60"))


def _ensure_verifier(factory, settings: Settings, run_id: str, spec: RunSettings, paths: StagePaths,
                     stage_id: int, dispatch) -> str:
    """Make sure a vLLM server with hidden-state extraction serves the verifier: the user's
    URL, or one the controller in the vLLM container starts for this run. A user URL that
    never accepts a connection fails the run within `unreachable_limit_s()`; one that answers
    but is not healthy yet (loading) gets the full 30 minutes."""
    deadline = time.monotonic() + 30 * 60
    log = paths.log("verifier")
    log.parent.mkdir(parents=True, exist_ok=True)
    if spec.vllm_endpoint:
        urls = [u.rstrip("/") for u in spec.vllm_endpoints]
        for url in urls[:-1]:  # every server of the run answers before training starts
            status = _wait_healthy(factory, run_id, url, log, stage_id, deadline, finish=False)
            if status != "succeeded":
                return status
        return _wait_healthy(factory, run_id, urls[-1], log, stage_id, deadline, finish=True)

    with factory() as s:
        dep = deployments.request_deployment(
            s, kind="verifier", model_path=spec.model, run_id=run_id, port=settings.verifier_port,
            endpoint=f"http://{settings.vllm_host}:{settings.verifier_port}",
            extra={"layer_ids": list(spec.layer_ids), "hidden_dir": str(paths.hidden)})
        dep_id = dep.id
    if dispatch is not None:
        dispatch()
    while time.monotonic() < deadline:
        with factory() as s:
            dep = deployments.get_deployment(s, dep_id)
            if dep.status == "up":
                stages.finish_stage(s, run_id, "verifier", "succeeded")
                return "succeeded"
            if dep.status in ("failed", "stopped"):
                stages.finish_stage(s, run_id, "verifier", "failed", dep.error or "the verifier server stopped")
                return "failed"
            if stages.heartbeat(s, stage_id):
                deployments.request_stop(s, dep_id)
                stages.finish_stage(s, run_id, "verifier", "cancelled", "cancelled by the user")
                if dispatch is not None:
                    dispatch()
                return "cancelled"
        time.sleep(2)
    with factory() as s:
        stages.finish_stage(s, run_id, "verifier", "failed", "the verifier server did not come up in 30 min")
    return "failed"


def _wait_healthy(factory, run_id: str, url: str, log: Path, stage_id: int, deadline: float, *,
                  finish: bool) -> str:
    """Wait for a user's verifier URL to answer /health with 200; `finish`: then record the
    verifier stage's success. A URL refusing connections for `unreachable_limit_s()` fails the
    stage naming it."""
    with open(log, "a") as fh:
        fh.write(f"waiting for the verifier at {url}\n")
    first_refused: float | None = None
    last = ""
    while time.monotonic() < deadline:
        ok, said = probe_health(url)
        if ok:
            if finish:
                with factory() as s:
                    stages.finish_stage(s, run_id, "verifier", "succeeded")
            return "succeeded"
        if said != last:
            last = said
            with open(log, "a") as fh:
                fh.write(f"{url}/health: {said}\n")
        answered = said.startswith("HTTP")
        first_refused = None if answered else (first_refused or time.monotonic())
        if first_refused is not None and time.monotonic() - first_refused >= unreachable_limit_s():
            with factory() as s:
                stages.finish_stage(s, run_id, "verifier", "failed",
                                    f"the vLLM endpoint {url} is unreachable ({said} for "
                                    f"{unreachable_limit_s():.0f} s); check the URL and that vLLM runs there")
            return "failed"
        with factory() as s:
            stages.note_stage(s, stage_id, f"waiting: {url}/health: {said}")
            if stages.heartbeat(s, stage_id):
                stages.finish_stage(s, run_id, "verifier", "cancelled", "cancelled by the user")
                return "cancelled"
        time.sleep(2)
    with factory() as s:
        stages.finish_stage(s, run_id, "verifier", "failed",
                            f"{url}/health did not answer 200 in 30 min (last: {last})")
    return "failed"
