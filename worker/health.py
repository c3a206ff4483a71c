"""Worker liveness that holds while a stage runs for hours.

`celery inspect ping` needs the worker's main loop, which a solo-pool worker busy with a
stage does not run, so a healthcheck built on it fails during every long stage. Instead a
thread in the worker rewrites `<home>/health/<node name>` every few seconds, and

    python -m worker.health NODE_NAME [--max-age 60]

exits 0 when that file is fresh, 1 otherwise (compose's healthcheck).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

BEAT_S = 5.0


def beat_path(home: Path, node: str) -> Path:
    return home / "health" / (re.sub(r"[^A-Za-z0-9@._-]+", "_", node) or "worker")


def beat(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()} {time.time():.3f}\n")
    tmp.replace(path)


def start_beating(home: Path, node: str, interval_s: float = BEAT_S) -> threading.Thread:
    path = beat_path(home, node)

    def loop() -> None:
        while True:
            try:
                beat(path)
            except OSError:
                pass
            time.sleep(interval_s)

    t = threading.Thread(target=loop, name="health-beat", daemon=True)
    t.start()
    return t


def age_s(home: Path, node: str) -> float | None:
    try:
        return time.time() - beat_path(home, node).stat().st_mtime
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    from runstore.settings import Settings

    p = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    p.add_argument("node", help="the worker's node name, e.g. gpu0@gpu-worker")
    p.add_argument("--max-age", type=float, default=60.0, help="seconds a beat stays fresh")
    args = p.parse_args(argv)
    age = age_s(Settings.from_env().home, args.node)
    if age is None or age > args.max_age:
        print(f"unhealthy: {args.node} last beat " + ("never" if age is None else f"{age:.0f}s ago"))
        return 1
    print(f"ok: {args.node} beat {age:.0f}s ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())
