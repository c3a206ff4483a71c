"""The train stage of a run asking for N nodes: N workers, one torchrun each, one rendezvous.

The broker carries N messages for the stage (worker.dispatch): the leading one's worker claims
the stage (runstore.stages.start_stage) and is node 0; it opens the attempt's node rows, waits
until N-1 other workers have each claimed a node rank (runstore.nodes.claim_node), then
publishes its rendezvous address (`SPEC_WORKER_ADDRESS` or its host name, and a free port)
and every node starts torchrun with `--nnodes N` and the c10d rendezvous there
(speculators.config.stages.Rendezvous). Node 0 tails the metrics (rank 0 of the trainers
writes them) and records the stage's end; a node that fails or stops beating ends the others
and the stage's error names it; a cancel reaches every node through its own heartbeat.
Kept free of Celery, like worker.runner.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from runstore import nodes, runs, stages
from runstore.models import StageStatus
from runstore.settings import Settings
from speculators import process
from speculators.config.run import RunSettings
from speculators.config.stages import Rendezvous, StagePaths
from worker import procs
from worker.pipeline import stage_argv

HEARTBEAT_S = 1.0
POLL_S = 0.5


def node_stale_s() -> float:
    """Seconds without a node's heartbeat before the others count it as gone."""
    return float(os.environ.get("SPEC_NODE_STALE_S", "30"))


def join_wait_s() -> float:
    """How long a joining message waits for node 0 to open the stage's attempt; a message left
    over after the stage ended (or never started) then ends quietly."""
    return float(os.environ.get("SPEC_NODE_JOIN_WAIT_S", "60"))


def address_of(settings: Settings) -> str:
    """The address other nodes reach this worker at: SPEC_WORKER_ADDRESS, else the host name."""
    return settings.worker_address or socket.gethostname()


def free_port(address: str) -> int:
    """A port free on `address` now (the OS picks it), for node 0's rendezvous store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def rdzv_id(run_id: str, attempt: int) -> str:
    return f"{run_id}-a{attempt}"


def node_log(paths: StagePaths, rank: int) -> Path:
    """Node 0 writes the stage's log; node r > 0 writes `train.node<r>.log` beside it."""
    return paths.log("train") if rank == 0 else paths.logs / f"train.node{rank}.log"


def waiting_message(nnodes: int, queue: str, rows: list) -> str:
    joined = [r for r in rows if r.status != nodes.FREE]
    who = ", ".join(nodes.describe(r) for r in joined)
    return (f"waiting for {nnodes} workers on queue {queue}: {len(joined)} joined ({who}); "
            f"start {nnodes - len(joined)} more worker(s) taking queue {queue}, or cancel the run")


def gather(store: JoinerStore, settings: Settings, *, run_id: str, stage_id: int, attempt: int,
           nnodes: int, worker: str, host: str, queue: str) -> tuple[str, object]:
    """Node 0: open the attempt's node rows, wait for the other nodes' workers, publish the
    rendezvous. ("ready", (Rendezvous, node id)), ("failed", message) or ("cancelled", None).
    Every store access goes through `store` (retried while the database is away); right after
    an outage a joined node gets `SPEC_NODE_STALE_S` to beat again before it counts as gone."""
    node_id = store(lambda s: nodes.open_nodes(s, stage_id, attempt, nnodes, worker=worker, host=host).id)
    deadline = time.monotonic() + settings.nodes_wait_s
    last_note = ""

    def look(s: Session):
        rows = nodes.nodes_of(s, stage_id, attempt)
        nodes.beat(s, node_id)
        return rows, stages.heartbeat(s, stage_id)

    while True:
        rows, cancelled = store(look)
        if cancelled:
            return "cancelled", None
        gone = [r for r in rows if r.node_rank and r.status != nodes.FREE and store.gone(r, node_stale_s())]
        if all(r.status != nodes.FREE for r in rows) and not gone:
            break
        note = waiting_message(nnodes, queue, [r for r in rows if r not in gone])
        if time.monotonic() >= deadline:
            joined = sum(r.status != nodes.FREE and r not in gone for r in rows)
            return "failed", (f"only {joined} of {nnodes} workers on queue {queue} joined within "
                              f"{settings.nodes_wait_s:.0f} s (SPEC_NODES_WAIT_S): start more workers taking "
                              f"queue {queue} (or ask for fewer nodes), then press Resume")
        if note != last_note:
            last_note = note
            store(lambda s: stages.note_stage(s, stage_id, note))
        time.sleep(POLL_S)
    address = address_of(settings)
    endpoint = f"{address}:{free_port(address)}"

    def announce(s: Session) -> None:
        nodes.publish(s, node_id, endpoint)
        stages.note_stage(s, stage_id, f"training on {nnodes} nodes, rendezvous at {endpoint}")

    store(announce)
    rdzv = Rendezvous(nnodes=nnodes, endpoint=endpoint, rdzv_id=rdzv_id(run_id, attempt), is_host=True,
                      local_addr=settings.worker_address or None)
    return "ready", (rdzv, node_id)


def peer_problem(store: JoinerStore, stage_id: int, attempt: int, rank: int,
                 stale_after_s: float | None = None) -> str | None:
    """What is wrong with another node of the attempt (failed, or no heartbeat), or None. Read
    through `store`: after a database outage the others get `stale_after_s` to beat again."""
    stale = node_stale_s() if stale_after_s is None else stale_after_s
    rows = store(lambda s: nodes.nodes_of(s, stage_id, attempt))
    for row in rows:
        if row.node_rank == rank:
            continue
        if row.status == nodes.FAILED:
            return f"{nodes.describe(row)} failed: {row.error or 'no message'}"
        if row.status != nodes.ENDED and store.gone(row, stale):
            return f"{nodes.describe(row)} is missing: no heartbeat for {stale:.0f} s (its worker or host stopped)"
    return None


def failure_message(store: JoinerStore, stage_id: int, attempt: int, own_error: str,
                    settle_s: float = 10.0) -> str:
    """Node 0's trainer failed: the trainers of all nodes end together, so name another node
    that failed or went missing (its worker reports within `settle_s`; a dead one has stopped
    beating) beside node 0's own error; which came first is not known here."""
    deadline = time.monotonic() + settle_s
    while True:
        why = peer_problem(store, stage_id, attempt, 0, stale_after_s=min(node_stale_s(), 3 * HEARTBEAT_S + 2))
        if why:
            return f"{why}; node 0: {own_error}"
        if time.monotonic() >= deadline:
            return own_error
        time.sleep(POLL_S)


def join(factory: sessionmaker[Session], settings: Settings, run_id: str, *, worker: str,
         python: str | None = None) -> str:
    """A joining message: claim a free node rank of the stage's running attempt, wait for node
    0's rendezvous, run this node's torchrun until it ends, the stage ends or a cancel comes.
    Returns `node` (this node ran) or `skipped` (no attempt to join: a message left over).
    Every store access goes through the retrying wrapper (worker.runner.storing): a database
    restart while this node waits or trains delays it, never ends its task; the claim is
    idempotent (nodes.claim_node), so a claim repeated after a lost reply keeps one rank."""
    store = JoinerStore(factory, settings.db_url)
    host = socket.gethostname()
    deadline = time.monotonic() + join_wait_s()
    while True:
        found = store(lambda s: _try_claim(s, run_id, worker, host))
        if found == "skipped":
            return "skipped"
        if found is not None:
            break
        if time.monotonic() >= deadline:
            return "skipped"
        time.sleep(POLL_S)
    stage_id, attempt, rank, own_id, spec, work_dir = found
    return _run_node(store, settings, run_id, spec, StagePaths(Path(work_dir)), stage_id=stage_id,
                     attempt=attempt, rank=rank, node_id=own_id, worker=worker, python=python)


def _try_claim(s: Session, run_id: str, worker: str, host: str):
    """One look at the run: "skipped" (nothing to join), None (not yet, or no free rank), or
    (stage id, attempt, rank, node row id, spec, work dir) once this worker holds a rank."""
    run = runs.get_run(s, run_id)
    if run is None:
        return "skipped"
    s.refresh(run)
    if run.cancel_requested:
        return "skipped"
    stage = stages.get_stage(s, run_id, "train")
    if stage is None or stage.status != StageStatus.RUNNING or stage.worker == worker:
        return None
    rank = nodes.claim_node(s, stage.id, stage.attempts, worker=worker, host=host)
    if rank is None:
        return None
    own_id = nodes.node(s, stage.id, stage.attempts, rank).id
    return stage.id, stage.attempts, rank, own_id, RunSettings.from_dict(run.spec), run.work_dir


class JoinerStore:
    """`store(fn)` of worker.runner.storing for a node of a multi-node stage (node 0 and the
    joining ones), remembering when the database last came back from an outage: the other
    nodes could not beat meanwhile either, so a node's heartbeat is judged stale only once the
    staleness limit has passed since then as well (`gone`, `lead_gone`)."""

    def __init__(self, factory: sessionmaker[Session], url: str) -> None:
        from worker.runner import storing  # worker.runner imports this module

        self._store = storing(factory, url)
        self.back_at = float("-inf")

    def __call__(self, fn: Callable[[Session], object]) -> object:
        tries = 0

        def counted(s: Session) -> object:
            nonlocal tries
            tries += 1
            if tries > 1:  # a retry: the database was away until now (or still is)
                self.back_at = time.monotonic()
            return fn(s)

        return self._store(counted)

    def gone(self, row, stale_after_s: float) -> bool:
        """`row`'s node has not beaten for `stale_after_s`, the store answering all that time."""
        return nodes.is_stale(row, stale_after_s) and time.monotonic() - self.back_at >= stale_after_s

    def lead_gone(self, lead) -> bool:
        """Node 0's row is missing, or stale with the store answering for `node_stale_s`."""
        return lead is None or self.gone(lead, node_stale_s())


def _attempt_over(s: Session, stage_id: int, attempt: int) -> bool:
    from runstore.models import Stage

    stage = s.get(Stage, stage_id)
    if stage is None:
        return True
    s.refresh(stage)
    return stage.status != StageStatus.RUNNING or stage.attempts != attempt


def _run_node(store: JoinerStore, settings: Settings, run_id: str, spec: RunSettings,
              paths: StagePaths, *, stage_id: int, attempt: int, rank: int, node_id: int, worker: str,
              python: str | None) -> str:
    # wait for node 0's rendezvous address, beating meanwhile
    def wait_step(s: Session):
        nodes.beat(s, node_id)
        if _attempt_over(s, stage_id, attempt) or stages.cancel_requested(s, run_id):
            nodes.end_node(s, node_id, nodes.ENDED, "the stage ended before training started")
            return "over", None
        return "lead", nodes.node(s, stage_id, attempt, 0)

    while True:
        what, lead = store(wait_step)
        if what == "over":
            return "node"
        if lead is not None and lead.address:
            break
        if store.lead_gone(lead):
            store(lambda s: nodes.end_node(s, node_id, nodes.ENDED, "node 0 went away before training started"))
            return "node"
        time.sleep(POLL_S)
    rdzv = Rendezvous(nnodes=spec.nodes, endpoint=lead.address, rdzv_id=rdzv_id(run_id, attempt), is_host=False,
                      local_addr=settings.worker_address or None)
    log_path = node_log(paths, rank)
    try:
        verifier_url = None
        if spec.mode in ("online", "hybrid") and not spec.vllm_endpoint:
            from worker.runner import verifier_url_in

            verifier_url = store(lambda s: verifier_url_in(s, run_id))
        kwargs = {"python": python} if python else {}
        argv = stage_argv(spec, "train", paths, verifier_url=verifier_url, rendezvous=rdzv, **kwargs)
    except ValueError as exc:
        store(lambda s: nodes.end_node(s, node_id, nodes.FAILED, str(exc)))
        return "node"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== train node {rank} attempt {attempt} on {worker} "
                 f"at {datetime.now().isoformat(timespec='seconds')}\n$ {shlex.join(argv)}\n")
    try:
        proc = process.start(argv, log=log_path, cwd=paths.work_dir, env=procs.child_env(settings.train_threads),
                             lifeline=process.Lifeline.COMMAND)
    except OSError as exc:
        store(lambda s: nodes.end_node(s, node_id, nodes.FAILED, f"could not start {argv[0]}: {exc}"))
        return "node"
    store(lambda s: nodes.beat(s, node_id, nodes.RUNNING))
    stop_reason = watch_node(store, proc, node_id=node_id, beat_check=lambda s: _joiner_check(
        s, store, run_id, stage_id, attempt))
    if stop_reason:
        status, error = nodes.ENDED, stop_reason
    elif proc.returncode == 0:
        status, error = nodes.ENDED, None
    else:
        status, error = nodes.FAILED, procs.error_summary(log_path, proc.returncode)
    store(lambda s: nodes.end_node(s, node_id, status, error))
    return "node"


def _joiner_check(s: Session, store: JoinerStore, run_id: str, stage_id: int, attempt: int) -> str | None:
    """Why a joining node must stop its trainer now, or None."""
    if stages.cancel_requested(s, run_id):
        return "cancelled by the user"
    if _attempt_over(s, stage_id, attempt):
        from runstore.models import Stage

        if s.get(Stage, stage_id).status == StageStatus.SUCCEEDED:
            return None  # node 0's trainer ended well: this one is finishing too
        return "the stage ended on node 0"
    if store.lead_gone(nodes.node(s, stage_id, attempt, 0)):
        return "node 0 stopped answering"
    return None


def watch_node(store: Callable[[Callable[[Session], object]], object], proc: process.Process, *, node_id: int,
               beat_check: Callable[[Session], str | None]) -> str | None:
    """Beat this node's row every second while its trainer runs; stop the trainer when
    `beat_check` gives a reason (returned), else return None once it exits. `store` runs each
    beat (worker.runner.storing: retried while the database is away, the trainer going on)."""
    last = 0.0
    while proc.poll() is None:
        if time.monotonic() - last >= HEARTBEAT_S:
            last = time.monotonic()

            def beat_and_check(s: Session) -> str | None:
                nodes.beat(s, node_id)
                return beat_check(s)

            why = store(beat_and_check)
            if why:
                proc.stop(grace_s=10.0)
                return why
        time.sleep(0.25)
    return None
