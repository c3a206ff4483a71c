"""Run a command as a process group that dies with the process that started it.

    python -m speculators.vllm.lifeline PARENT_PID CMD [ARGS...]

A vLLM server is a tree (the API server, its engine process, workers). Killing its parent
with SIGKILL (an OOM kill, `kill -9` of the dashboard's controller) left that tree running
and holding the port: PR_SET_PDEATHSIG alone reaches one process, and vLLM's engine
process does not watch its parent. This tiny process is started as the leader of a new
process group, runs CMD as its child in that group, and when PARENT_PID dies (the kernel's
PR_SET_PDEATHSIG, with a poll of the parent as a fallback off Linux) or when it is told to
stop (SIGTERM/SIGINT/SIGHUP), it sends SIGTERM to the whole group, waits up to
$SPECULATORS_LIFELINE_GRACE_S (default 10 s) and SIGKILLs what is left. It exits with CMD's
code (128 + N when CMD was killed by signal N), after killing any straggler of the group.
The group id is this process's pid, so whoever started it stops everything with one killpg.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Sequence

GRACE_ENV = "SPECULATORS_LIFELINE_GRACE_S"
_PR_SET_PDEATHSIG = 1


def wrap(argv: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """`argv` run under a lifeline bound to `parent_pid` (default: this process). Start the
    result with ``start_new_session=True`` so the lifeline leads its own group."""
    return [sys.executable, "-m", "speculators.vllm.lifeline", str(parent_pid or os.getpid()), *argv]


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (Linux /proc; empty elsewhere). Zombies are
    left out: they hold nothing and go when their parent reaps them."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces or parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _kill_others(sig: int) -> bool:
    """Signal every member of our group but us; True when any was left."""
    me = os.getpid()
    others = [p for p in group_members(os.getpgrp()) if p != me]
    for pid in others:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return bool(others)


def _reap(child: int) -> int | None:
    """The child's exit code as a shell reports it, or None while it runs."""
    try:
        pid, status = os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        return 0
    if pid == 0:
        return None
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _shutdown(child: int, grace_s: float) -> int:
    """SIGTERM the group, wait for the child, SIGKILL whatever is left; the child's code."""
    _kill_others(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    code = _reap(child)
    while code is None and time.monotonic() < deadline:
        time.sleep(0.1)
        code = _reap(child)
    # stragglers (an engine process that ignored SIGTERM, the child itself after the grace)
    for _ in range(50):
        if not _kill_others(signal.SIGKILL):
            break
        if code is None:
            code = _reap(child)
        time.sleep(0.1)
    if code is None:
        try:
            _, status = os.waitpid(child, 0)
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        except ChildProcessError:
            code = 128 + signal.SIGKILL
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parent, cmd = int(args[0]), args[1:]
    grace_s = float(os.environ.get(GRACE_ENV, "10"))
    stop = {"asked": False}

    def asked(signum, frame):  # noqa: ARG001
        stop["asked"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, asked)
    try:  # the kernel tells us (SIGUSR1) the moment the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before we were armed
        return 137
    child = os.fork()
    if child == 0:  # the command, in our group; default signal handling again
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(cmd[0], cmd)
        except OSError as exc:
            print(f"error: cannot run {cmd[0]!r}: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
    while True:
        code = _reap(child)
        if code is not None:  # the command ended on its own: take its children along
            if _kill_others(signal.SIGTERM):
                time.sleep(0.5)
                for _ in range(50):
                    if not _kill_others(signal.SIGKILL):
                        break
                    time.sleep(0.1)
            return code
        if stop["asked"] or os.getppid() != parent:
            return _shutdown(child, grace_s)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
