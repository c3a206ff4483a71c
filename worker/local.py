"""Local mode: the dashboard and a CPU worker in one command, no Docker, no GPU.

    python -m worker.local            # then open http://127.0.0.1:8501

Uses Redis at 127.0.0.1:6379 when one answers, otherwise Celery's filesystem broker
under the home directory, so nothing else has to be installed. The dashboard answers at
once; the first start builds the tiny verifier (`speculators make-tiny-model`) that the form
offers by default in the background, its progress shown on the dashboard. Each child
(worker, vLLM controller, dashboard) is restarted alone when it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speculators import process

ROOT = Path(__file__).resolve().parent.parent


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except Exception:
        return False


def local_env(home: Path, redis_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["SPEC_HOME"] = str(home)
    env.setdefault("SPEC_MAX_GPUS", "0")
    env.setdefault("SPEC_TRAIN_THREADS", "1")
    env.setdefault("SPEC_DEFAULT_MODEL", str(home / "models" / "tiny-llama"))
    if "SPEC_BROKER_URL" not in os.environ:
        if redis_url and redis_answers(redis_url):
            env["SPEC_BROKER_URL"] = redis_url
        else:
            env["SPEC_BROKER_URL"] = "filesystem://"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def worker_argv(queue: str, name: str, filesystem: bool) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue,
            "--pool", "solo", "--concurrency", "1", "-n", name, "--loglevel", "INFO"]
    if filesystem:  # the filesystem transport has no broadcast: skip the cluster chatter
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def dashboard_argv(port: int, address: str) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"),
            "--server.port", str(port), "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]


def needs_tiny_model(env: dict[str, str]) -> bool:
    model = Path(env["SPEC_DEFAULT_MODEL"])
    return model.is_absolute() and not (model / "config.json").is_file()


def tiny_build_argv(env: dict[str, str]) -> list[str]:
    from worker.tinybuild import building_dir

    return [sys.executable, "-u", "-m", "speculators", "make-tiny-model", "--output",
            str(building_dir(Path(env["SPEC_DEFAULT_MODEL"])))]


@dataclass
class Child:
    """One supervised process: restarted when it exits unless we are stopping, with a back-off
    that grows while it keeps dying young."""

    name: str
    argv: list[str]
    restart: bool = True
    proc: process.Process | None = None
    started_at: float = 0.0
    backoff_s: float = 1.0
    next_start: float = 0.0
    starts: int = 0
    log: Path | None = None

    def start(self, env: dict[str, str]) -> None:
        # the child dies with this launcher even when it is SIGKILLed; its output goes to its
        # log, or through ours
        self.proc = process.start(self.argv, log=self.log, env=env, cwd=ROOT, lifeline=process.Lifeline.COMMAND)
        self.started_at = time.monotonic()
        self.starts += 1


class Supervisor:
    """Runs the children; one that exits is restarted alone (a dashboard crash never touches
    the worker, so a running stage carries on). `state_file` lists the live pids."""

    def __init__(self, env: dict[str, str], children: list[Child], state_file: Path,
                 on_exit: Callable[[Child, int], None] | None = None) -> None:
        self.env, self.children, self.state_file, self.on_exit = env, children, state_file, on_exit
        self.stopping = False

    def _write_state(self) -> None:
        state = {c.name: {"pid": c.proc.pid if c.proc and c.proc.poll() is None else None, "starts": c.starts}
                 for c in self.children}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def add(self, child: Child) -> None:
        self.children.append(child)
        child.start(self.env)
        self._write_state()

    def step(self) -> None:
        now = time.monotonic()
        changed = False
        for c in list(self.children):
            if c.proc is not None and c.proc.poll() is not None:
                rc = c.proc.returncode
                c.proc = None
                changed = True
                if self.on_exit:
                    self.on_exit(c, rc)
                if not c.restart:
                    self.children.remove(c)
                    continue
                lived = now - c.started_at
                c.backoff_s = 1.0 if lived > 60 else min(30.0, c.backoff_s * 2)
                c.next_start = now + c.backoff_s
                print(f"{c.name} exited with code {rc}; restarting it in {c.backoff_s:.0f} s", file=sys.stderr, flush=True)
            if c.proc is None and c.restart and now >= c.next_start and not self.stopping:
                c.start(self.env)
                changed = True
        if changed:
            self._write_state()

    def stop(self, grace_s: float = 20.0) -> None:
        self.stopping = True
        process.stop_all([c.proc for c in self.children if c.proc is not None], grace_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.local", description=__doc__.splitlines()[0])
    p.add_argument("--home", default=os.environ.get("SPEC_HOME", str(Path.home() / ".speculators-app")),
                   help="where the database, data, runs and models live")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="dashboard bind address (default: this machine only)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="Redis to use when it answers; otherwise a filesystem broker is used")
    p.add_argument("--no-tiny-model", action="store_true", help="do not build the tiny verifier")
    args = p.parse_args(argv)

    home = Path(args.home).expanduser().resolve()
    env = local_env(home, args.redis_url)
    os.environ.update({k: v for k, v in env.items() if k.startswith("SPEC_")})
    from runstore import open_store
    from runstore.settings import Settings

    settings = Settings.from_env()
    settings.ensure_dirs()
    open_store(settings.db_url)  # migrate once before the children start
    filesystem = env["SPEC_BROKER_URL"].startswith("filesystem")
    print(f"broker: {env['SPEC_BROKER_URL']}{' (no Redis answered; embedded filesystem broker)' if filesystem else ''}")
    sup = Supervisor(env, [], home / "local-children.json")
    sup.add(Child("worker", worker_argv("gpu", "gpu0@%h", filesystem)))
    sup.add(Child("vllm-controller", worker_argv("vllm", "vllm@%h", filesystem)))
    sup.add(Child("dashboard", dashboard_argv(args.port, args.address)))
    print(f"dashboard: http://{args.address}:{args.port}  (Ctrl-C stops everything)", flush=True)
    if not args.no_tiny_model and needs_tiny_model(env):
        sup.on_exit = _tiny_build_finished(Path(env["SPEC_DEFAULT_MODEL"]))
        _start_tiny_build(sup, Path(env["SPEC_DEFAULT_MODEL"]))

    def _stop(*_):
        sup.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not sup.stopping:
        sup.step()
        time.sleep(0.5)
    sup.stop()
    return 0


def _start_tiny_build(sup: Supervisor, model: Path) -> None:
    """Build the tiny verifier in the background; the dashboard shows its progress."""
    from worker.tinybuild import building_dir, log_file, write_status

    tmp = building_dir(model)
    if tmp.exists():
        shutil.rmtree(tmp)
    log = log_file(model)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    write_status(model, "building", started=time.time())
    print(f"building the tiny CPU verifier in {model} in the background (log: {log})", flush=True)
    sup.add(Child("tiny-model-build", tiny_build_argv(sup.env), restart=False, log=log))


def _tiny_build_finished(model: Path) -> Callable[[Child, int], None]:
    from worker.tinybuild import building_dir, last_line, log_file, read_status, write_status

    def done(child: Child, rc: int) -> None:
        if child.name != "tiny-model-build":
            return
        status = read_status(model)
        started = time.time() - (status.elapsed_s if status else 0.0)
        tmp = building_dir(model)
        if rc == 0 and (tmp / "config.json").is_file():
            tmp.rename(model)
            write_status(model, "done", started=started)
            print(f"tiny verifier ready in {model}", flush=True)
        else:
            why = last_line(log_file(model)) or f"exit code {rc}"
            write_status(model, "failed", started=started, error=f"{why} (exit code {rc})")
            print(f"building the tiny verifier failed: {why}", file=sys.stderr, flush=True)

    return done


if __name__ == "__main__":
    sys.exit(main())
