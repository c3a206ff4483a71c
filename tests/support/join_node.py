"""A joining node's worker as a process of its own (worker.multinode.join, the code a Celery
worker runs for a joining message), so a test can SIGKILL it mid-training as a dead host's
worker; its trainer is tests.support.gloo_loop under the service's torchrun arguments.
Settings come from the SPEC_* environment.

    python -m tests.support.join_node RUN_ID WORKER OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from runstore import open_store
from runstore.settings import Settings
from worker import multinode

from tests.support import gloo_loop


def main(run_id: str, worker: str, out_dir: str) -> None:
    multinode.stage_argv = lambda spec, stage, paths, rendezvous=None, **_: gloo_loop.torchrun_argv(
        rendezvous, Path(out_dir))
    settings = Settings.from_env()
    print(multinode.join(open_store(settings.db_url, migrate=False), settings, run_id, worker=worker), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
