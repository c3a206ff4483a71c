"""Exec a command that the kernel kills when its parent (the worker) dies.

    python -m worker.pdeathsig PARENT_PID CMD [ARGS...]

Linux's PR_SET_PDEATHSIG survives exec, so the armed process becomes CMD itself. Doing
this in a separate tiny process instead of a `preexec_fn` keeps fork safe in a worker
that runs threads (the outbox dispatcher).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the restarted worker's recovery kills orphans
        pass
    if os.getppid() != parent:  # the worker died before we were armed
        sys.exit(137)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
