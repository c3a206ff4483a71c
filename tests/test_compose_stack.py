"""The product as a user of a CPU host meets it: the README's CPU compose command
(compose.yaml + compose.cpu.yaml) built and brought up with Docker, then driven in headless
Chromium: a run launched with the New run form's defaults, its live metrics, its success,
"Serve best checkpoint", a chat completion sent to the served endpoint with the spec-decode
counters of its /metrics moving, and the server's log shown on the run page.

The base images come from Debian's archive (scripts/build_base_images.sh: no Docker Hub on
these machines), torch's CPU wheel from wheels/ (filled from pip's own sources with `pip
download`), the host's CA bundle from certs/ (package downloads behind a TLS proxy). The
images stay for the next run (Docker's layer cache); the project's containers, network and
volumes go (`down -v`). A unique project name and free host ports: it never meets another
stack. Fails (never skips) when Docker cannot run: `make test-deps` installs it.
Screenshots, build times and the containers' logs: test-artifacts/compose-*.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from speculators.vllm.readiness import free_port

from tests.support.browser_support import ARTIFACTS, ROOT, chromium_page, dashboard_healthy, launch_from_form, open_run, shot
from tests.support.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
FILES = ("compose.yaml", "compose.cpu.yaml")
BASE_PYTHON = "speculators-base/python:bookworm"
BASE_REDIS = "speculators-base/redis:bookworm"
HOST_CA = "host-ca.crt"
TIMES = ARTIFACTS / "compose-times.jsonl"


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, log: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=ROOT, env=env, timeout=timeout, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{out.stdout}\n")
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-4000:]}")
    return out


def _require_docker() -> None:
    for exe in ("docker", "docker-compose"):
        if shutil.which(exe) is None:
            pytest.fail(f"{exe} is not installed: run `make test-deps` (Debian's docker.io and docker-compose)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.fail(f"the Docker engine does not answer ({info.stderr.strip()[:300]}): "
                    "run `make test-deps`, which starts dockerd when it is not running")


def _torch_cpu_wheel() -> str:
    """Put the host's torch CPU wheel in wheels/ (compose.cpu.yaml's TORCH_SPEC) unless it is there."""
    version = metadata.version("torch")
    spec = f"torch=={version if '+' in version else version + '+cpu'}"
    wheels = ROOT / "wheels"
    tag = spec.split("==", 1)[1]
    if not any(p.name.startswith(f"torch-{tag}-") for p in wheels.glob("torch-*.whl")):
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), spec], timeout=900)
    return spec


def _host_ca() -> str:
    """The CA bundle this host's pip trusts, for the image builds' downloads."""
    src = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    if not Path(src).is_file():
        return ""
    dst = ROOT / "certs" / HOST_CA
    if not dst.is_file() or dst.read_bytes() != Path(src).read_bytes():
        shutil.copyfile(src, dst)
    return HOST_CA


def _record(**fields) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(TIMES, "a") as fh:
        fh.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}) + "\n")


def _health(project: str) -> dict[str, str]:
    """service -> health (or state for a container without a health check), from Docker."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True).stdout.split()
    if not ids:
        return {}
    rows = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout or "[]")
    out = {}
    for r in rows:
        svc = r["Config"]["Labels"].get("com.docker.compose.service", "?")
        st = r["State"]
        out[svc] = (st.get("Health") or {}).get("Status") or f"{st['Status']}:{st.get('ExitCode')}"
    return out


@pytest.fixture(scope="module")
def stack():
    _require_docker()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "compose-stack.log"
    log.write_text("")
    t0 = time.monotonic()
    _run(["bash", str(ROOT / "scripts" / "build_base_images.sh")], timeout=1200, log=log)
    base_s = time.monotonic() - t0
    project = f"spectest{uuid.uuid4().hex[:10]}"
    dash_port, vllm_port = free_port(), free_port()
    while vllm_port == dash_port:
        vllm_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPEC_", "COMPOSE_", "DOCKER_BUILDKIT"))}
    env.update(SPEC_PYTHON_IMAGE=BASE_PYTHON, SPEC_REDIS_IMAGE=BASE_REDIS, SPEC_CA_BUNDLE=_host_ca(),
               SPEC_TORCH_SPEC=_torch_cpu_wheel(), SPEC_DASHBOARD_PORT=str(dash_port), SPEC_VLLM_PORT=str(vllm_port))
    compose = ["docker-compose", "-p", project]
    for f in FILES:
        compose += ["-f", f]
    try:
        t0 = time.monotonic()
        _run([*compose, "build"], env=env, timeout=2400, log=log)
        build_s = time.monotonic() - t0
        t0 = time.monotonic()
        _run([*compose, "up", "-d"], env=env, timeout=900, log=log)
        services = {"redis", "dashboard", "worker", "vllm"}
        try:
            wait_for(lambda: all(_health(project).get(s) == "healthy" for s in services)
                     or any(v in ("unhealthy",) or v.startswith("exited") and not v.endswith(":0")
                            for v in _health(project).values()), 600, interval=3, what="the services' health")
        except TimeoutError:
            pytest.fail(f"not healthy within 600 s: {_health(project)}")
        health = _health(project)
        assert all(health.get(s) == "healthy" for s in services) and health.get("tiny-model") == "exited:0", health
        _record(base_images_s=round(base_s, 1), build_s=round(build_s, 1),
                up_healthy_s=round(time.monotonic() - t0, 1))
        url = f"http://127.0.0.1:{dash_port}"
        assert dashboard_healthy(url)
        yield {"compose": compose, "env": env, "url": url, "vllm": f"http://127.0.0.1:{vllm_port}", "log": log}
    finally:
        _run([*compose, "logs", "--no-color", "--tail", "300"], env=env, timeout=120, log=log, check=False)
        _run([*compose, "down", "-v", "--remove-orphans"], env=env, timeout=300, log=log, check=False)


def _draft_tokens(endpoint: str) -> float:
    """vLLM's spec-decode draft-token counter, parsed with prometheus_client (not our parser)."""
    text = requests.get(endpoint + "/metrics", timeout=10).text
    total, seen = 0.0, False
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_draft_tokens"):
                total += sample.value
                seen = True
    assert seen, "the served endpoint's /metrics has no vllm:spec_decode_num_draft_tokens counter"
    return total


def test_cpu_stack_run_serve_and_chat_in_the_browser(stack):
    url, endpoint = stack["url"], stack["vllm"]
    name = "compose e2e"
    t0 = time.monotonic()
    with chromium_page() as page:
        launch_from_form(page, url, name)
        shot(page, "compose-new-run.png")
        open_run(page, name)
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=900_000)
        page.wait_for_timeout(1500)  # let the chart draw
        shot(page, "compose-live-metrics.png")
        # live: the charts are there while the run still trains (the default run trains for minutes)
        assert page.get_by_text(re.compile(r"Status: running")).first.is_visible()
        page.get_by_text(re.compile(r"Status: succeeded")).first.wait_for(timeout=2_400_000)
        run_s = time.monotonic() - t0
        shot(page, "compose-succeeded.png")

        t1 = time.monotonic()
        page.get_by_role("button", name="Serve best checkpoint").click()
        page.get_by_text("up, healthy").first.wait_for(timeout=900_000)
        serve_s = time.monotonic() - t1
        shot(page, "compose-served.png")

        # the endpoint the page shows is the one a client on the host reaches
        models = requests.get(endpoint + "/v1/models", timeout=10).json()["data"]
        model = models[0]["id"]
        before = _draft_tokens(endpoint)
        resp = requests.post(endpoint + "/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me about the sea and its waves."}],
            "max_tokens": 48, "temperature": 0})
        assert resp.status_code == 200, resp.text[:500]
        reply = resp.json()["choices"][0]["message"]["content"]
        assert reply.strip(), resp.json()
        after = _draft_tokens(endpoint)
        assert after > before, (before, after)

        # the server's log, written by the controller in the vllm container, shown by the dashboard
        expander = page.locator('[data-testid="stExpander"]', has_text="Server log")
        expander.get_by_text("Server log").click()
        code = expander.locator("code").first
        code.wait_for(timeout=30_000)
        shown = code.inner_text()
        shot(page, "compose-server-log.png")
        assert shown.strip() and shown.strip() != "(empty)"
        listing = _run([*stack["compose"], "exec", "-T", "vllm", "ls", "/var/lib/speculators/deployments"],
                       env=stack["env"]).stdout.split()
        logs = [x for x in listing if x.endswith(".log")]
        assert logs, listing
        real = _run([*stack["compose"], "exec", "-T", "vllm", "cat", f"/var/lib/speculators/deployments/{logs[-1]}"],
                    env=stack["env"]).stdout
        lines = [x for x in shown.splitlines() if len(x.strip()) > 20]
        assert lines and all(x.strip() in real for x in lines[:5]), (lines[:5], real[-2000:])
    _record(run_s=round(run_s, 1), serve_s=round(serve_s, 1), draft_tokens=after - before, model=model)
