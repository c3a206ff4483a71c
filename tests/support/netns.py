"""Two worker "hosts" in network namespaces of their own, and a PostgreSQL and a Redis the
test owns (so it can kill and restart them), for tests/test_two_hosts_netns.py.

Topology (three veth pairs on a private 10.x subnet chosen from the pid; no bridge, no IP
forwarding, nothing else on the machine touched):

    main (root namespace)  m_a ----- a_m  host A  a_b ----- b_a  host B  b_m ----- m_b  main

The main side (dashboard, dispatcher, PostgreSQL, Redis) listens on its two veth addresses;
host A reaches it only through `main_for_a`, host B only through `main_for_b`, and A and B
reach each other through `a_to_b` / `b_to_a` (torchrun's rendezvous and gloo).
Namespaces share the filesystem: a temp folder is the "NFS" shared root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def netns_problem() -> str | None:
    """Why this machine cannot build namespaces (the skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install -y iproute2)"
    probe = f"spec-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` is unavailable here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """The namespaces and their addresses; `close()` removes everything (also what runs inside)."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = os.getpid()
        self.net = f"10.{200 + n % 50}.{(n // 50) % 250}"
        self.ns_a, self.ns_b = f"spec-{self.tag}-a", f"spec-{self.tag}-b"
        self.main_for_a, self.a_addr = f"{self.net}.1", f"{self.net}.2"
        self.main_for_b, self.b_addr = f"{self.net}.5", f"{self.net}.6"
        self.a_to_b, self.b_to_a = f"{self.net}.9", f"{self.net}.10"
        t = self.tag
        self.if_ab, self.if_ba = f"s{t}ab", f"s{t}ba"  # the A-B link's two ends (GLOO_SOCKET_IFNAME)

    def up(self) -> Hosts:
        t = self.tag
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        links = [(f"s{t}ma", None, self.main_for_a, f"s{t}am", self.ns_a, self.a_addr),
                 (f"s{t}mb", None, self.main_for_b, f"s{t}bm", self.ns_b, self.b_addr),
                 (self.if_ab, self.ns_a, self.a_to_b, self.if_ba, self.ns_b, self.b_to_a)]
        for left, left_ns, left_addr, right, right_ns, right_addr in links:
            _ip("link", "add", left, "type", "veth", "peer", "name", right)
            if left_ns is None:
                self.made.append(left)  # the root-side end; deleting it removes the pair
            for name, ns, addr in ((left, left_ns, left_addr), (right, right_ns, right_addr)):
                if ns:
                    _ip("link", "set", name, "netns", ns)
                _ip("addr", "add", f"{addr}/30", "dev", name, ns=ns)
                _ip("link", "set", name, "up", ns=ns)
        return self

    def argv(self, ns: str, argv: list[str], hostname: str | None = None) -> list[str]:
        """`argv` run inside namespace `ns`; with `hostname`, in its own UTS namespace under
        that host name (what `socket.gethostname()` and Celery's %h say there)."""
        if hostname is None:
            return ["ip", "netns", "exec", ns, *argv]
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                hostname, *argv]

    def close(self) -> None:
        for ns in [m for m in self.made if m.startswith("spec-")]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # only what this test started runs there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for name in reversed(self.made):
            if name.startswith("spec-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self.made.clear()


def _stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _wait_port(host: str, port: int, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")


class OwnPostgres:
    """A PostgreSQL cluster in a temp folder owned by `postgres` (initdb, trust auth), listening
    on the given addresses only; `kill()` is an immediate shutdown (no checkpoint: crash
    recovery at the next start), `start()` brings it back on the same data."""

    PORT = 5432  # the addresses are this test's own, so the default port collides with nobody

    def __init__(self, addresses: list[str], subnet: str) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = bins[-1].parent
        self.addresses = addresses
        self.dir = Path(tempfile.mkdtemp(prefix="spec-netns-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data, self.log = self.dir / "data", self.dir / "pg.log"
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                           "--no-sync"])
        with open(self.data / "pg_hba.conf", "a") as fh:
            fh.write(f"host all all {subnet} trust\n")
        self.start()
        self._as_postgres([str(self.bin / "psql"), "-h", addresses[0], "-p", str(self.PORT), "-U", "postgres",
                           "-d", "postgres", "-c", "CREATE DATABASE spec"])

    def url(self, address: str) -> str:
        return f"postgresql://postgres@{address}:{self.PORT}/spec"

    def _as_postgres(self, argv: list[str]) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              timeout=120, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stdout[-1500:]} {done.stderr[-1500:]}")

    def start(self) -> None:
        opts = f"-c listen_addresses={','.join(self.addresses)} -p {self.PORT} -k {self.dir} -c fsync=off"
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                           "-w", "-t", "60", "start"])
        _wait_port(self.addresses[0], self.PORT, 30, "postgres")

    def kill(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class OwnRedis:
    """A redis-server on the given addresses with an append-only file (as compose.yaml runs
    it); `kill()` is SIGKILL, `start()` restarts it on the same data."""

    PORT = 6379

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.dir = Path(tempfile.mkdtemp(prefix="spec-netns-redis-"))
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def url(self, address: str) -> str:
        return f"redis://{address}:{self.PORT}/0"

    def start(self) -> None:
        argv = ["redis-server", "--bind", *self.addresses, "--port", str(self.PORT), "--dir", str(self.dir),
                "--appendonly", "yes", "--save", "", "--protected-mode", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.addresses[0], self.PORT, 30, "redis-server", self.proc, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


stop_process = _stop
