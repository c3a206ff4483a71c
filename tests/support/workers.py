"""Helpers for tests that drive real worker processes (Celery workers started as subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env(home: Path, broker_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SPEC_HOME": str(home), "SPEC_BROKER_URL": broker_url, "SPEC_MAX_GPUS": "0",
                "SPEC_TRAIN_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env.pop("SPEC_RESULT_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def start_worker(env: dict[str, str], *, queue: str = "gpu", name: str = "gpu0@test",
                 log_path: Path | None = None) -> subprocess.Popen:
    """A real Celery worker process (solo pool: one job at a time, like one per GPU)."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue, "--pool", "solo",
            "--concurrency", "1", "-n", name, "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)


def run_with_stages(factory, run_id: str):
    """A run fresh from the store and its stages by name (tests poll this)."""
    from runstore import runs

    with factory() as s:
        run = runs.get_run(s, run_id)
        s.refresh(run)
        return run, {x.name: x for x in run.stages}
