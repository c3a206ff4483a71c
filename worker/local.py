"""Local mode: the dashboard and a CPU worker in one command, no Docker, no GPU.

    python -m worker.local            # then open http://127.0.0.1:8501

Uses Redis at 127.0.0.1:6379 when one answers, otherwise Celery's filesystem broker
under the home directory, so nothing else has to be installed. The first start builds
the tiny verifier (`speculators make-tiny-model`) that the form offers by default.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def ensure_tiny_model(env: dict[str, str]) -> None:
    model = Path(env["SPEC_DEFAULT_MODEL"])
    if (model / "config.json").is_file() or "/" in env["SPEC_DEFAULT_MODEL"] and not model.is_absolute():
        return
    print(f"building the tiny CPU verifier in {model} (first start only) ...", flush=True)
    tmp = model.with_name(model.name + ".building")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    subprocess.run([sys.executable, "-m", "speculators", "make-tiny-model", "--output", str(tmp)],
                   env=env, check=True)
    tmp.rename(model)


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
    if not args.no_tiny_model:
        ensure_tiny_model(env)
    filesystem = env["SPEC_BROKER_URL"].startswith("filesystem")
    print(f"broker: {env['SPEC_BROKER_URL']}{' (no Redis answered; embedded filesystem broker)' if filesystem else ''}")
    children = {
        "worker": subprocess.Popen(worker_argv("gpu", "gpu0@%h", filesystem), env=env, cwd=str(ROOT)),
        "vllm-controller": subprocess.Popen(worker_argv("vllm", "vllm@%h", filesystem), env=env, cwd=str(ROOT)),
        "dashboard": subprocess.Popen(dashboard_argv(args.port, args.address), env=env, cwd=str(ROOT)),
    }
    print(f"dashboard: http://{args.address}:{args.port}  (Ctrl-C stops everything)", flush=True)

    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rc = 0
    while not stopping:
        for name, proc in children.items():
            if proc.poll() is not None:
                print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                rc, stopping = proc.returncode or 1, True
                break
        time.sleep(0.5)
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return rc


if __name__ == "__main__":
    sys.exit(main())
