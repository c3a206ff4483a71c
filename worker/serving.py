"""What the vLLM controller and the dashboard need to tell the truth about a served model.

- which process listens on a port (Linux /proc: the LISTEN socket's inode, then which
  process holds it), so "up, healthy" means OUR server answers, not whatever took the port;
- a record of each server the controller started (pid = process group, its start time and
  the machine's boot id, port), so a restarted controller recognises its own orphan by more
  than a PID that may have been reused, and stops it;
- the name a client sends (`--served-model-name`, one per deployment), the curl command the
  panel shows, and the dashboard's check that the port serves that name.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

# ----------------------------------------------------------------- names, commands


def served_name(run_id: str | None, deployment_id: int) -> str:
    """The model id a client sends to a served draft. One per deployment, so the dashboard
    can tell this deployment's server from an older one still holding the port."""
    return f"draft-{run_id}-{deployment_id}" if run_id else f"draft-{deployment_id}"


def curl_command(base_url: str, model: str, api_key_required: bool) -> str:
    """A chat completion request ready to copy (the key from $VLLM_API_KEY when one is needed)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    parts = [f"curl {shlex.quote(base_url.rstrip('/') + '/v1/chat/completions')}",
             "-H 'Content-Type: application/json'"]
    if api_key_required:
        parts.append('-H "Authorization: Bearer $VLLM_API_KEY"')
    parts.append(f"-d {shlex.quote(body)}")
    return " \\\n  ".join(parts)


# ----------------------------------------------------------------- ports and processes


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wait_port_closed(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout_s
    while port_open(port, host):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def listening_inodes(port: int) -> set[int] | None:
    """Inodes of LISTEN sockets on `port` (IPv4 and IPv6), None where /proc cannot tell."""
    found: set[int] = set()
    seen_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_any = True
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(cols[9]))
    return found if seen_any else None


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()  # fields from "state" on


def _pids() -> list[int]:
    try:
        return [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies hold nothing: left out)."""
    out = []
    for pid in _pids():
        f = _stat_fields(pid)
        if f and len(f) > 2 and f[0] not in ("Z", "X") and int(f[2]) == pgid:
            out.append(pid)
    return out


def port_holders(port: int) -> list[int] | None:
    """Pids holding a LISTEN socket on `port` that this user can see; None where /proc cannot
    tell (not Linux). An empty list with the port open means a process we may not inspect."""
    inodes = listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return []
    return sorted(pid for pid in _pids() if _socket_inodes(pid) & inodes)


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant. A served draft is nested: the controller's lifeline
    runs `speculators serve`, which runs vLLM under a lifeline of its own (another process
    group), whose API server holds the port and forks the engine."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        f = _stat_fields(pid)
        if f and len(f) > 1 and f[0] not in ("Z", "X"):
            children.setdefault(int(f[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_listens_on(root: int, port: int) -> bool | None:
    """Whether `root` or one of its descendants holds the LISTEN socket on `port` (None:
    /proc cannot tell)."""
    inodes = listening_inodes(port)
    if inodes is None:
        return None
    return any(_socket_inodes(pid) & inodes for pid in tree_pids(root))


def describe_pid(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = " ".join(c.decode(errors="replace") for c in cmd if c)
    except OSError:
        text = ""
    return f"pid {pid}" + (f" ({text[:160]})" if text else "")


def describe_holders(port: int) -> str:
    holders = port_holders(port)
    if holders:
        return ", ".join(describe_pid(p) for p in holders)
    return "a process this controller cannot see (another user or container)"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the boot id, a pid's identity."""
    f = _stat_fields(pid)
    try:
        return int(f[19]) if f else None  # field 22 of /proc/PID/stat
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# ----------------------------------------------------------------- the controller's records


@dataclass
class ServerRecord:
    """A server the controller started: its lifeline's pid (= the process group), identity,
    port, and what the dashboard shows."""

    deployment_id: int
    pid: int
    pgid: int
    port: int
    start_ticks: int | None
    boot_id: str
    host: str
    served_model: str | None
    api_key_required: bool
    kv_cache: str


def record_path(home: Path, deployment_id: int) -> Path:
    return home / "deployments" / f"{deployment_id}.json"


def write_record(home: Path, rec: ServerRecord) -> None:
    path = record_path(home, rec.deployment_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(rec)))
    tmp.replace(path)


def read_record(home: Path, deployment_id: int) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(record_path(home, deployment_id).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_alive(rec: ServerRecord) -> bool:
    """Whether the recorded server still runs: same machine boot and host, and its group
    leader is the same process (same pid AND start time: a reused pid has another), or the
    leader is gone but its group still has members (Linux never reuses a pid while a
    process group of that id exists). A bystander is never taken for it."""
    if rec.boot_id != boot_id() or rec.host != socket.gethostname() or rec.start_ticks is None:
        return False
    f = _stat_fields(rec.pgid)
    if f and f[0] not in ("Z", "X"):  # the leader runs: the same process only with the same start
        return len(f) > 19 and int(f[19]) == rec.start_ticks
    # gone, or a zombie nobody reaped (its parent, the controller, died): only members count
    return bool(group_pids(rec.pgid))


# ----------------------------------------------------------------- the dashboard's check


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    text: str  # what the panel shows after the status


def check_endpoint(endpoint: str, expected_model: str | None, api_key: str | None, timeout_s: float = 2.0) -> Verdict:
    """Whether the endpoint is the deployment's server: /health answers 200 and /v1/models
    lists the name this deployment serves (a server of another deployment, or any other
    program on the port, lists something else)."""
    base = endpoint.rstrip("/")
    try:
        if requests.get(base + "/health", timeout=timeout_s).status_code != 200:
            return Verdict(False, "not answering /health")
        if expected_model is None:
            return Verdict(True, "healthy")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        resp = requests.get(base + "/v1/models", timeout=timeout_s, headers=headers)
        if resp.status_code == 401:
            return Verdict(False, "answers, but asks for an API key this dashboard does not have")
        ids = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
    except (requests.RequestException, ValueError, AttributeError):
        return Verdict(False, "not answering /health")
    if expected_model in ids:
        return Verdict(True, "healthy")
    return Verdict(False, f"the port answers, but serves {', '.join(map(str, ids)) or 'no model'}, "
                          f"not {expected_model}: another server holds it")
