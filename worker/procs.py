"""What the worker says about its children: the error line of a stage's or server's log, a
log's tail for the dashboard, the environment a child runs with. Starting, awaiting and
stopping them is `speculators.process`."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path


# Terminal control sequences (colour, cursor moves): a child run with FORCE_COLOR, or a tool
# that colours regardless of its output, must not put escape codes in the dashboard's log view.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def log_tail(path: Path | str | None, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a log file as plain text (no escape codes)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(_ANSI.sub("", data).splitlines()[-lines:])


def error_summary(log_path: Path | str | None, returncode: int, cause_first: bool = False) -> str:
    """The line that says what went wrong. A process ended by a signal says so first (its
    log's last line is whatever it printed before, often a header); otherwise a CLI
    `error: ...` line, else the cause found in the log (`speculators.vllm.logcause`: a
    vLLM start prints its real error mid-log, then wrappers and shutdown noise), else the
    last line. `cause_first` (a server's log) puts the cause before the `error:` line, which
    for `speculators serve` only wraps it."""
    from speculators.process import read_lines
    from speculators.vllm.logcause import cause_line, clean

    if returncode < 0 or returncode in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
        return killed_summary(returncode)
    lines = read_lines(log_path) if log_path else []
    cause = cause_line(lines)
    if cause_first and cause:
        return f"{cause} (exit code {returncode})"
    for line in reversed(lines):
        if line.startswith("error:"):
            return f"{line[len('error:'):].strip()} (exit code {returncode})"
    if cause:
        return f"{cause} (exit code {returncode})"
    for line in reversed(lines):
        if line.strip() and not line.startswith(("$ ", "=== ")):
            return f"{_log_message(clean(line))[:500]} (exit code {returncode})"
    return f"exit code {returncode}"


# A line in the commands' log format (speculators/console.py): `[time] LEVEL message  file.py:N`.
_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] [A-Z]+ +(?P<message>.*?)(?: {2,}[\w.-]+\.py:\d+)?$")


def _log_message(line: str) -> str:
    """The message of a log-format line (no time, level or file:line); other lines as they are."""
    m = _LOG_LINE.match(line)
    return m.group("message") if m and m.group("message") else line


def killed_summary(returncode: int) -> str:
    """`killed (signal 9: SIGKILL)` and what usually sends it. Popen reports a signal as a
    negative code; a shell or launcher in between reports 128 + signal."""
    signum = -returncode if returncode < 0 else returncode - 128
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    text = f"killed (signal {signum}: {name})"
    if signum == signal.SIGKILL:
        text += ("; the kernel's out-of-memory killer does this when the machine runs out of memory "
                 "(check `dmesg` or the container's memory limit), or someone ran kill -9")
    elif signum == signal.SIGTERM:
        text += "; stopped from outside (a shutdown or kill)"
    return text


def child_env(threads: int) -> dict[str, str]:
    """Our environment with thread counts set, unbuffered output, and this checkout first on
    the path (a child runs the same `speculators` and `worker` code as the worker)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
