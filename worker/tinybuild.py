"""The first-start build of the tiny CPU verifier, run in the background by the local mode.

`speculators make-tiny-model` takes from seconds to many minutes depending on the machine,
so the dashboard must not wait for it. The launcher runs it as a child process with its
output in a log and keeps a small status file next to the model; the dashboard reads both
(`read_status`) and shows the latest output line and the time elapsed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def status_file(model: Path) -> Path:
    return model.with_name(model.name + ".build.json")


def log_file(model: Path) -> Path:
    return model.with_name(model.name + ".build.log")


def building_dir(model: Path) -> Path:
    return model.with_name(model.name + ".building")


def write_status(model: Path, state: str, *, started: float, error: str | None = None) -> None:
    path = status_file(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, "started": started, "finished": None if state == "building" else time.time(),
                               "error": error, "log": str(log_file(model))}))
    os.replace(tmp, path)


@dataclass(frozen=True)
class BuildStatus:
    state: str  # building | done | failed
    elapsed_s: float
    last_line: str
    error: str | None


def last_line(path: Path, max_bytes: int = 8192) -> str:
    """The newest non-empty output line (progress bars that rewrite a line with \\r count)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    lines = [x.strip() for x in data.replace("\r", "\n").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def read_status(model: Path, now: float | None = None) -> BuildStatus | None:
    """The build's state, or None when no build was started (e.g. the model came ready-made)."""
    try:
        raw = json.loads(status_file(model).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    started = float(raw.get("started") or 0.0)
    end = raw.get("finished") or (now if now is not None else time.time())
    return BuildStatus(state=str(raw.get("state")), elapsed_s=max(0.0, float(end) - started),
                       last_line=last_line(Path(raw.get("log") or log_file(model))), error=raw.get("error"))
