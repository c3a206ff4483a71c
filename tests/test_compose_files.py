"""compose.yaml and the Dockerfiles, checked statically (no Docker engine here): the compose
file against the Compose specification (strict parser: unknown keys and bad values fail),
plus the rules this deployment relies on; the Dockerfiles parsed with Docker's own parser
and linted."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import dockerfile
import pytest
import yaml
from compose_spec import PyCompose

from worker.celery_app import GPU_QUEUE, VLLM_QUEUE

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, $$ for a literal $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1)) or (m.group(2) or "")
    return _VAR.sub(sub, text)


def load(env: dict[str, str] | None = None) -> dict:
    text = interpolate(COMPOSE.read_text(), env or {})
    PyCompose.from_yaml(text).validate()  # raises on anything outside the spec
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load()


def test_valid_against_compose_spec_with_defaults_and_overrides():
    load()
    cfg = load({"SPEC_DASHBOARD_BIND": "0.0.0.0", "SPEC_WORKER_GPUS": "4", "SPEC_WORKER_GPU_IDS": "0,1,2,3",
                "SPEC_VLLM_GPU_IDS": "4", "HF_TOKEN": "x"})
    assert cfg["services"]["dashboard"]["ports"] == ["0.0.0.0:8501:8501"]
    assert cfg["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0,1,2,3"]
    assert cfg["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["4"]
    assert str(cfg["services"]["worker"]["environment"]["SPEC_MAX_GPUS"]) == "4"


def test_no_top_level_name_for_compose_v1(compose):
    """Debian's docker-compose 1.x rejects a top-level `name:`; version-less files it accepts."""
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets", "x-spec-env", "x-spec-volumes"}


def test_spec_parser_is_strict():
    text = interpolate(COMPOSE.read_text(), {})
    with pytest.raises(ValueError):
        PyCompose.from_yaml(text.replace("shm_size:", "shm_sise:", 1))
    with pytest.raises(ValueError):
        PyCompose.from_yaml(text.replace("condition: service_healthy", "condition: healthy", 1))


def test_services_and_gpu_reservations(compose):
    services = compose["services"]
    assert set(services) == {"redis", "dashboard", "worker", "vllm"}
    ids = {}
    for name in ("worker", "vllm"):
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert "count" not in dev  # a count lets Docker hand both services the same GPU
        ids[name] = {i for x in dev["device_ids"] for i in x.split(",")}
    assert not ids["worker"] & ids["vllm"], ids  # by default the worker and vLLM get different GPUs
    for name in ("redis", "dashboard"):
        assert "deploy" not in services[name]


def test_dashboard_bound_to_localhost_by_default(compose):
    assert compose["services"]["dashboard"]["ports"] == ["127.0.0.1:8501:8501"]
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_every_service_has_an_exec_form_healthcheck(compose):
    for name, svc in compose["services"].items():
        test = svc["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] == "CMD", name
    for name in ("dashboard", "worker", "vllm"):
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_named_volumes_match_the_settings_paths(compose):
    assert {"data", "runs", "models", "hf-cache", "db", "redis"} <= set(compose["volumes"])
    for name in ("dashboard", "worker", "vllm"):
        svc = compose["services"][name]
        env = svc["environment"]
        mounts = dict(v.split(":", 1)[::-1] for v in svc["volumes"])  # container path -> volume
        assert mounts[env["SPEC_DATA_ROOT"]] == "data"
        assert mounts[env["SPEC_RUNS_ROOT"]] == "runs"
        assert mounts[env["SPEC_MODELS_ROOT"]] == "models"
        assert mounts[env["HF_HOME"]] == "hf-cache"
        db_file = env["SPEC_DB_URL"].removeprefix("sqlite:///")
        assert mounts[str(Path(db_file).parent)] == "db"  # the SQLite file lives on its own volume
        assert env["SPEC_BROKER_URL"].startswith("redis://redis:")


def test_commands_point_at_real_code(compose):
    s = compose["services"]
    assert (ROOT / s["dashboard"]["command"][s["dashboard"]["command"].index("run") + 1]).is_file()
    for name, queue in (("worker", GPU_QUEUE), ("vllm", VLLM_QUEUE)):
        cmd = s[name]["command"]
        importlib.import_module(cmd[cmd.index("-A") + 1])
        assert cmd[cmd.index("-Q") + 1] == queue
        assert cmd[cmd.index("--pool") + 1] == "solo" and cmd[cmd.index("--concurrency") + 1] == "1"
        node = cmd[cmd.index("-n") + 1].replace("%h", s[name]["hostname"])
        hc = s[name]["healthcheck"]["test"]
        # the liveness file the worker beats from a thread (answers while a stage runs), by node name
        assert hc[hc.index("-m") + 1] == "worker.health" and hc[hc.index("-m") + 2] == node
        assert "inspect" not in hc
    for name in ("dashboard", "worker", "vllm"):
        assert (ROOT / s[name]["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.vllm"])
def test_dockerfile_lint(name):
    cmds = dockerfile.parse_file(str(ROOT / name))
    kinds = [c.cmd.upper() for c in cmds]
    assert kinds[0] == "FROM"
    image = cmds[0].value[0]
    assert ":" in image and not image.endswith(":latest"), "pin the base image tag"
    for c in cmds:
        if c.cmd.upper() == "RUN":
            line = c.value[0]
            if "apt-get install" in line:
                assert "--no-install-recommends" in line and "-y" in line
                assert "rm -rf /var/lib/apt/lists/*" in line
            if "pip install" in line:
                assert "--no-cache-dir" in line
        if c.cmd.upper() in ("COPY", "ADD"):
            assert c.cmd.upper() == "COPY", "use COPY; ADD fetches URLs and unpacks archives"
            for src in c.value[:-1]:
                if src != "README.md":  # the lead's file, present in the repository
                    assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
        if c.cmd.upper() in ("CMD", "ENTRYPOINT"):
            assert c.json, f"{name}: {c.cmd} must use the exec (JSON) form"
    users = [c.value[0] for c in cmds if c.cmd.upper() == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as an unprivileged user"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")


def test_vllm_image_resets_the_serve_entrypoint():
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile.vllm"))
    (entry,) = [c for c in cmds if c.cmd.upper() == "ENTRYPOINT"]
    assert entry.value == () and entry.json


def test_vllm_image_is_new_enough_for_hidden_state_export():
    """speculators.vllm.launch needs vLLM >= 0.22 (extract_hidden_states + KV connector)."""
    image = dockerfile.parse_file(str(ROOT / "Dockerfile.vllm"))[0].value[0]
    version = tuple(int(x) for x in image.rsplit(":v", 1)[1].split("."))
    assert version >= (0, 22, 0), image
