"""Worker processes for the run store's concurrency tests (spawned: this module imports the
run store only, so each process starts fast). Each waits at a barrier so they write at once."""

from __future__ import annotations

from runstore import metrics, stages
from runstore.db import open_store


def claim_all(url: str, worker: str, run_ids: list[str], barrier, out) -> None:
    """One worker process: wait for the others, then try to claim every run's first stage."""
    factory = open_store(url, migrate=False)
    barrier.wait()
    won = []
    for rid in run_ids:
        with factory() as s:
            if stages.start_stage(s, rid, "prepare", worker=worker, log_path="/l", host=worker) is not None:
                won.append(rid)
    out.put((worker, won))


def write_metrics(url: str, writer: int, steps: int, barrier, out) -> None:
    """One writer process: the same (run, type, step) keys as every other writer, its own values."""
    factory = open_store(url, migrate=False)
    barrier.wait()
    for step in range(1, steps + 1):
        rec = {"type": "train", "ts": float(step), "epoch": 0, "step": step, "total_steps": steps,
               "metrics": {"loss": float(writer)}}
        with factory() as s:
            metrics.ingest_records(s, "r1", [rec, {"type": "val", "ts": 0.0, "epoch": 0, "step": step,
                                                   "metrics": {"loss": float(writer)}}])
    out.put(writer)
