"""speculators.process with real processes: the stop reaches the whole group and kills what
ignores SIGTERM, readiness fails on an early exit naming the log's cause, and a lifeline
takes the child along when its starter is SIGKILLed. Timeouts here only bound the waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from speculators import process
from speculators.vllm.logcause import cause_line

from tests.support.pids import alive
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]

# Ignores SIGTERM, starts a grandchild (same group) that ignores it too, says both pids, waits.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grand = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print("pids", grand.pid, flush=True)
    time.sleep(600)
""")
# Exits normally on SIGTERM, with a grandchild that does too.
POLITE = textwrap.dedent("""
    import subprocess, sys, time
    grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("pids", grand.pid, flush=True)
    time.sleep(600)
""")


def grandchild_of(proc: process.Process) -> int:
    """The pid the child printed once it started its grandchild."""

    def said() -> int | None:
        line = next((x for x in proc.log_lines() if x.startswith("pids ")), None)
        return int(line.split()[1]) if line else None

    return proc.wait_ready(said, 60, poll_s=0.05)


@pytest.mark.parametrize("lifeline", [process.Lifeline.NONE, process.Lifeline.COMMAND, process.Lifeline.GROUP])
def test_stop_kills_a_child_that_ignores_sigterm_and_its_whole_group(tmp_path, lifeline, monkeypatch):
    monkeypatch.setenv(process.GRACE_ENV, "0.5")  # the group leader's own grace (Lifeline.GROUP)
    proc = process.start([sys.executable, "-c", STUBBORN], log=tmp_path / "child.log", lifeline=lifeline)
    grand = grandchild_of(proc)
    assert alive(proc.pid) and alive(grand) and os.getpgid(grand) == proc.pid
    proc.stop(grace_s=0.5)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)  # it ignored SIGTERM: killed
    assert not alive(grand)  # the grandchild was in the group
    assert not process.group_alive(proc.pid)


def test_stop_terms_the_group_first(tmp_path):
    """A child that honours SIGTERM ends by it, its grandchild too: SIGKILL is not needed."""
    proc = process.start([sys.executable, "-c", POLITE], log=tmp_path / "child.log")
    grand = grandchild_of(proc)
    proc.stop(grace_s=60)
    assert proc.returncode == -signal.SIGTERM
    assert not alive(grand)


def test_stop_all_and_stop_group(tmp_path):
    a = process.start([sys.executable, "-c", STUBBORN], log=tmp_path / "a.log")
    b = process.start([sys.executable, "-c", POLITE], log=tmp_path / "b.log")
    grands = [grandchild_of(a), grandchild_of(b)]
    process.stop_all([a, b], grace_s=0.5)
    assert (a.returncode, b.returncode) == (-signal.SIGKILL, -signal.SIGTERM)
    assert not any(map(alive, grands))
    # a group this process holds no handle of (one an earlier process started)
    other = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    grand = int(other.stdout.readline().split()[1])
    process.stop_group(other.pid, grace_s=0.5)
    assert other.wait(60) == -signal.SIGKILL and not alive(grand)


CAUSE = textwrap.dedent("""
    import sys
    print("INFO starting the engine")
    print("ValueError: Available memory is less than desired")
    print("RuntimeError: Engine core initialization failed. See root cause above.")
    print("INFO shutting down")
    sys.exit(3)
""")


@pytest.mark.parametrize("to_file", [True, False])
def test_an_early_exit_fails_readiness_with_the_logs_cause(tmp_path, to_file):
    log = tmp_path / "server.log" if to_file else None
    proc = process.start([sys.executable, "-c", CAUSE], log=log, lifeline=process.Lifeline.GROUP)
    with pytest.raises(process.ExitedEarly) as info:
        proc.wait_ready(lambda: False, 120, poll_s=0.05, cause=cause_line)
    assert info.value.returncode == 3
    assert info.value.cause == "ValueError: Available memory is less than desired"
    assert "exited with code 3" in str(info.value) and "less than desired" in str(info.value)
    if to_file:
        assert "INFO shutting down" in log.read_text()


def test_readiness_by_http_probe_and_by_timeout(tmp_path):
    port = _free_port()
    server = textwrap.dedent(f"""
        import time
        from http.server import BaseHTTPRequestHandler, HTTPServer
        time.sleep(0.5)
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404); self.end_headers()
            def log_message(self, *a): pass
        HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)
    with process.start([sys.executable, "-c", server], log=tmp_path / "server.log") as proc:
        assert proc.wait_ready(f"http://127.0.0.1:{port}/health", 60, poll_s=0.1) is True
        assert not process.http_ok(f"http://127.0.0.1:{port}/missing")
        with pytest.raises(process.TimedOut):
            proc.wait_ready(lambda: None, 0.2, poll_s=0.05)
    assert proc.returncode is not None  # the block stopped it


def test_an_argument_list_only(tmp_path):
    with pytest.raises(TypeError, match="argument list"):
        process.start("echo hi; rm -rf /", log=tmp_path / "x.log")  # type: ignore[arg-type]


# The starter: starts the stubborn child under a lifeline, writes the pids, waits to be killed.
STARTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from speculators import process
    mode, code, log, out = sys.argv[1:]
    proc = process.start([sys.executable, "-c", code], log=log, lifeline=process.Lifeline(mode))
    while not any(l.startswith("pids ") for l in proc.log_lines()):
        time.sleep(0.05)
    grand = [l for l in proc.log_lines() if l.startswith("pids ")][0].split()[1]
    Path(out).write_text(f"{proc.pid} {grand}")
    time.sleep(600)
""")


@pytest.mark.parametrize("lifeline", [process.Lifeline.GROUP, process.Lifeline.COMMAND])
def test_a_sigkilled_starter_takes_its_child_along(tmp_path, lifeline):
    """GROUP: the child and its grandchild (both ignoring SIGTERM) go with the starter.
    COMMAND: the command itself goes (the kernel's parent-death signal)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **{process.GRACE_ENV: "0.5"})
    out = tmp_path / "pids"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, lifeline.value, STUBBORN, str(tmp_path / "c.log"),
                                str(out)], env=env)
    pids: list[int] = []
    try:
        wait_for(lambda: out.exists() and out.read_text() or starter.poll() is not None, 60, interval=0.05)
        assert starter.poll() is None
        pids = [int(x) for x in out.read_text().split()]
        child, grand = pids
        assert alive(child) and alive(grand)
        starter.kill()  # SIGKILL: no handler or finally block of the starter runs
        starter.wait()
        wait_for(lambda: not alive(child), 60, interval=0.05)
        if lifeline is process.Lifeline.GROUP:
            wait_for(lambda: not alive(grand), 60, interval=0.05)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_group_lifeline_reports_the_commands_exit_code(tmp_path):
    ok = process.start([sys.executable, "-c", "import sys; sys.exit(5)"], log=tmp_path / "a.log",
                       lifeline=process.Lifeline.GROUP)
    assert ok.wait(60) == 5
    killed = process.start([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                           log=tmp_path / "b.log", lifeline=process.Lifeline.GROUP)
    assert killed.wait(60) == 128 + signal.SIGKILL
    missing = process.start(["/nonexistent/program"], log=tmp_path / "c.log", lifeline=process.Lifeline.COMMAND)
    assert missing.wait(60) == 127 and "cannot run '/nonexistent/program'" in (tmp_path / "c.log").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_foreground_child_shares_our_group_and_writes_console_and_log(tmp_path, capfd):
    """A pipeline stage from a terminal: in our process group (the terminal's Ctrl-C reaches
    it), its output on the console and in the log, a `\\r` progress update passed on before
    its line ends, and a stop that reaches the child alone (never our own group)."""
    log = tmp_path / "logs" / "stage.log"
    log.parent.mkdir()
    log.write_bytes(b"=== header\n")
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time
        print("pgid", os.getpgid(0), flush=True)
        sys.stdout.write("progress 1/2\\r"); sys.stdout.flush()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.02)
        print("progress 2/2 done", flush=True)
        time.sleep(600)
    """)
    proc = process.start([sys.executable, "-c", script], log=log, foreground=True)
    try:
        assert not proc.own_group
        wait_for(lambda: b"progress 1/2\r" in log.read_bytes(), 60, interval=0.05)  # before the line ended
        go.touch()
        wait_for(lambda: b"progress 2/2 done" in log.read_bytes(), 60, interval=0.05)
        pgid_line = next(x for x in proc.log_lines() if x.startswith("pgid "))
        assert int(pgid_line.split()[1]) == os.getpgid(0)
    finally:
        proc.stop(grace_s=5)
    assert proc.returncode == -signal.SIGTERM
    proc.join_output(10)
    text = log.read_bytes()
    assert text.startswith(b"=== header\n")  # appended, never truncated
    assert b"progress 1/2\rprogress 2/2 done\n" in text
    out = capfd.readouterr().out
    assert "progress 1/2\rprogress 2/2 done\n" in out and f"pgid {os.getpgid(0)}" in out
