"""Whether a process a test started (or its child) still runs."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Runs and is no zombie (an exited process not yet reaped holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
