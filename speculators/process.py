"""Managed child processes: start one, wait until it is ready, stop it, and never leave it behind.

The one way this project runs a server or a stage as a child (the demo's vLLM server and its
stages, gen-and-train's stages, a served checkpoint, the worker's stages and its vLLM
controller, local mode's children):

- `start(argv, ...)`: an argument list (never a shell string), its own process group (so a
  stop reaches its children too), its output appended to a log file or copied to our stdout
  with the last lines kept, and optionally a lifeline (below); or, for a pipeline stage run
  from a terminal (`foreground`), in our group with its output on the console and in the log;
- `Process.wait_ready(ready, ...)`: poll a callable (or a URL that must answer HTTP 200)
  until it says ready; a child that exits first raises `ExitedEarly` naming the line of its
  log that says why (the `cause` picker is passed in: `speculators.vllm.logcause` sits
  above this layer); too long raises `TimedOut`;
- `Process.stop(grace_s)`, `stop_all`, `stop_group`: SIGTERM to the whole group, SIGKILL to
  what is left after the grace period.

A lifeline makes the child die with the process that started it, even when that one is
SIGKILLed (an OOM kill, `kill -9` of a worker):
- `Lifeline.COMMAND`: the kernel's PR_SET_PDEATHSIG, armed by this module's tiny program
  just before it execs the command (so the pid is the command's; arming it in a
  `preexec_fn` instead is not fork-safe in a process that runs threads). It reaches the one
  process, enough for a stage (torchrun takes its own workers along).
- `Lifeline.GROUP`: this module's program leads the group, runs the command as its child
  and, when the starter dies or it is told to stop, SIGTERMs the whole group, waits up to
  $SPECULATORS_LIFELINE_GRACE_S (10 s) and SIGKILLs what is left. A vLLM server is a tree
  (API server, engine, workers) whose engine does not watch its parent; PR_SET_PDEATHSIG
  alone left that tree holding the port. The handle's pid is the leader's (= the group),
  its exit code the command's (128 + N when the command was killed by signal N).

    python -m speculators.process command|group PARENT_PID CMD [ARGS...]
"""

from __future__ import annotations

import collections
import ctypes
import enum
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence, TypeVar

from speculators.errors import UserError

GRACE_ENV = "SPECULATORS_LIFELINE_GRACE_S"
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
T = TypeVar("T")


class Lifeline(enum.Enum):
    NONE = "none"
    COMMAND = "command"  # the command dies with its starter (PR_SET_PDEATHSIG before exec)
    GROUP = "group"  # the whole process group dies with its starter (a leader watches)


class NotReady(UserError):
    """The child did not become ready."""


class ExitedEarly(NotReady):
    """The child exited before it was ready; `cause` is its log's line that says why, if any."""

    def __init__(self, argv: Sequence[str], returncode: int, cause: str | None):
        self.returncode, self.cause = returncode, cause
        super().__init__(f"{argv[0] if argv else 'the process'} exited with code {returncode} before it was ready"
                         + (f": {cause}" if cause else ""))


class TimedOut(NotReady):
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(f"not ready after {timeout_s:g}s")


# ------------------------------------------------------------------------------------ start


class Process:
    """A started child: the leader of its own process group (pid == pgid)."""

    def __init__(self, popen: subprocess.Popen, argv: Sequence[str], log_path: str | None,
                 log_file: IO | None = None, own_group: bool = True):
        self.popen, self.argv, self.log_path = popen, list(argv), log_path
        self.own_group = own_group
        self._log_file = log_file
        self._tail: collections.deque[str] = collections.deque(maxlen=2000)
        self._pump: threading.Thread | None = None
        if popen.stdout is not None:  # copied to our stdout (and the log file, if any), the last lines kept
            self._pump = threading.Thread(target=self._copy, args=(popen.stdout,), daemon=True)
            self._pump.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def _copy(self, stream) -> None:
        """Copy the child's output as it comes (chunks, so a progress bar's `\\r` updates show)
        to our stdout and the log file, keeping its last lines."""
        out = getattr(sys.stdout, "buffer", None)
        partial = b""
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):
            if self._log_file is not None:
                self._log_file.write(chunk)
                self._log_file.flush()
            try:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                    sys.stdout.flush()
            except (OSError, ValueError):
                pass
            *lines, partial = (partial + chunk).split(b"\n")
            self._tail.extend(line.decode("utf-8", errors="replace") for line in lines)
        if partial:
            self._tail.append(partial.decode("utf-8", errors="replace"))
        if not self.own_group and self._log_file is not None:
            self._log_file.close()  # a foreground child's log was opened for the copier alone

    def join_output(self, timeout: float | None = None) -> None:
        """Wait until the output of a child that exited has been copied (console and log)."""
        if self._pump is not None:
            self._pump.join(timeout)

    def log_lines(self) -> list[str]:
        """The child's output so far: the lines copied to our stdout, or its log file's end."""
        if self._pump is not None:
            if self.popen.poll() is not None:
                self._pump.join(timeout=2)  # the last output of a child that just exited
            return list(self._tail)
        if self._log_file is not None:
            try:
                self._log_file.flush()
            except (OSError, ValueError):
                pass
        return read_lines(self.log_path)

    def wait_ready(self, ready: Callable[[], T] | str, timeout_s: float, poll_s: float = 1.0,
                   cause: Callable[[list[str]], str | None] | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> T:
        """`wait_ready` with this child watched and its log read for the cause."""
        return wait_ready(ready, timeout_s, poll_s, process=self, log_lines=self.log_lines, cause=cause,
                          sleep=sleep)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.own_group:
            stop_all([self], grace_s)
        else:  # it shares our group: signal the one process, never our own group
            _stop_one(self.popen, grace_s)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wrap(argv: Sequence[str], lifeline: Lifeline, parent_pid: int | None = None) -> list[str]:
    """`argv` as started under `lifeline`, bound to `parent_pid` (default: this process)."""
    if lifeline is Lifeline.NONE:
        return list(argv)
    return [sys.executable, "-m", "speculators.process", lifeline.value, str(parent_pid or os.getpid()), *argv]


def start(argv: Sequence[str], *, log: Path | str | IO | None = None, env: dict[str, str] | None = None,
          cwd: Path | str | None = None, lifeline: Lifeline = Lifeline.NONE,
          foreground: bool = False) -> Process:
    """Start `argv` in a new process group (and session), stdin closed. `log`: a path the
    output is appended to (its folder is created), an open file it is written to, or None
    to copy it to our stdout keeping the last lines (`Process.log_lines`).

    `foreground=True` is a pipeline stage run from a terminal: the child stays in our process
    group, so the terminal's Ctrl-C reaches it directly (the trainer checkpoints on it), keeps
    our stdin, and its output goes to our stdout *and* to `log` (a path)."""
    if isinstance(argv, str):
        raise TypeError("start() takes an argument list, never a shell string")
    if foreground and not isinstance(log, (str, Path)):
        raise TypeError("a foreground child's log is a path")
    log_file: IO | None = None
    log_path: str | None = None
    opened = None
    if isinstance(log, (str, Path)):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        opened = open(log, "ab", buffering=0)
        out, log_path = opened, str(log)
    elif log is not None:
        out, log_file, log_path = log, log, getattr(log, "name", None)
    else:
        out = subprocess.PIPE
    if foreground:
        out, log_file, opened = subprocess.PIPE, opened, None  # the copier writes the log
    try:
        popen = subprocess.Popen(wrap(argv, lifeline), stdout=out, stderr=subprocess.STDOUT,
                                 stdin=None if foreground else subprocess.DEVNULL, env=env,
                                 cwd=None if cwd is None else str(cwd), start_new_session=not foreground)
    except BaseException:
        if log_file is not None and foreground:
            log_file.close()
        raise
    finally:
        if opened is not None:
            opened.close()  # the child holds its own descriptor
    return Process(popen, argv, log_path, log_file, own_group=not foreground)


def read_lines(path: str | Path | None, max_bytes: int = 512 * 1024) -> list[str]:
    """The last `max_bytes` of a log file as lines ([] when there is none)."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []


# ------------------------------------------------------------------------------------ ready


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether `url` answers HTTP 200 (never raises on network errors)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(ready: Callable[[], T] | str, timeout_s: float, poll_s: float = 1.0, *,
               process: Process | subprocess.Popen | None = None,
               log_lines: Callable[[], list[str]] | None = None,
               cause: Callable[[list[str]], str | None] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `ready()` every `poll_s` until it returns something true, and return that (a URL
    instead: until it answers HTTP 200). With a `process`, its exit fails the wait at once
    (`ExitedEarly`, with `cause(log_lines())`), and a ready answer counts only while it runs:
    a port answered by someone else is no sign of ours. `TimedOut` after `timeout_s`."""
    check: Callable[[], T] = (lambda: http_ok(ready)) if isinstance(ready, str) else ready  # type: ignore[assignment]
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            why = cause(log_lines()) if cause and log_lines else None
            raise ExitedEarly(getattr(process, "argv", None) or process.args, process.returncode, why)
        value = check()
        if value and (process is None or process.poll() is None):
            return value
        if time.monotonic() > deadline:
            raise TimedOut(timeout_s)
        sleep(poll_s)


# ------------------------------------------------------------------------------------- stop


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


def group_alive(pgid: int) -> bool:
    """Whether any live process of the group is left (zombies do not count)."""
    if os.path.isdir("/proc/self"):
        return bool(group_members(pgid))
    try:  # no /proc: kill(0) counts zombies, so the caller reaps its own child first
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when it is gone (or not ours to signal)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(groups: list[tuple[int, subprocess.Popen | None]], grace_s: float, kill_wait_s: float = 5.0) -> None:
    def alive(group: tuple[int, subprocess.Popen | None]) -> bool:
        pgid, popen = group
        if popen is not None:
            popen.poll()  # reaps the leader, so it is not counted
        return group_alive(pgid)

    left = [g for g in groups if g[1] is None or g[1].poll() is None or group_alive(g[0])]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        left = [g for g in left if _signal_group(g[0], sig)]
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            left = [g for g in left if alive(g)]
            if left:
                time.sleep(0.1)
        if not left:
            break
    for _, popen in groups:
        if popen is not None:
            try:
                popen.wait(timeout=kill_wait_s)
            except subprocess.TimeoutExpired:
                pass


def _stop_one(popen: subprocess.Popen, grace_s: float, kill_wait_s: float = 5.0) -> None:
    """SIGTERM one child (not a group leader), SIGKILL it after `grace_s`, and reap it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        if popen.poll() is not None:
            return
        popen.send_signal(sig)
        try:
            popen.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all(processes: Iterable[Process], grace_s: float = 10.0) -> None:
    """SIGTERM each child's whole group, SIGKILL what is left of them after `grace_s` (one
    grace period for all), and reap the children."""
    _stop([(p.pid, p.popen) for p in processes], grace_s)


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """Stop a process group this process holds no handle of (one an earlier process started)."""
    _stop([(pgid, None)], grace_s)


# ------------------------------------------------------------------------- the lifelines


def _arm_pdeathsig(sig: int) -> None:
    try:  # the kernel sends `sig` the moment our parent dies (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # elsewhere: the group leader also polls its parent
        pass


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
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


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


def _lead_group(parent: int, cmd: list[str]) -> int:
    """The GROUP lifeline: run `cmd` as our child in our group; when it ends take its children
    along, when the parent dies or we are told to stop take the whole group down."""
    grace_s = float(os.environ.get(GRACE_ENV, "10"))
    stop = {"asked": False}

    def asked(signum, frame):  # noqa: ARG001
        stop["asked"] = True

    for sig in _STOP_SIGNALS:
        signal.signal(sig, asked)
    _arm_pdeathsig(signal.SIGUSR1)
    if os.getppid() != parent:  # the parent died before we were armed
        return 137
    child = os.fork()
    if child == 0:  # the command, in our group; default signal handling again
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _exec(cmd)
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


def _exec(cmd: list[str]) -> None:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"error: cannot run {cmd[0]!r}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    mode, parent, cmd = Lifeline(args[0]), int(args[1]), args[2:]
    if mode is Lifeline.GROUP:
        return _lead_group(parent, cmd)
    _arm_pdeathsig(signal.SIGKILL)  # survives exec: the armed process becomes the command
    if os.getppid() != parent:  # the parent died before we were armed
        return 137
    _exec(cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
