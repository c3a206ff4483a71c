"""Shared fixtures: tiny verifiers built once per test session (CPU, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Random-weight 8-layer Llama (hidden 64) with a Llama-3-style chat template."""
    from speculators.tiny.builders import build_tiny_verifier

    return build_tiny_verifier(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Random-weight 8-layer Qwen3 (hidden 64) with a ChatML chat template."""
    from speculators.tiny.builders import build_tiny_verifier

    return build_tiny_verifier(tmp_path_factory.mktemp("tiny_qwen3"), arch="qwen3")


@pytest.fixture(scope="session")
def tiny_llama_trained(tmp_path_factory):
    """The tiny Llama after 200 steps on ShareGPT chat text: peaked, learnable outputs."""
    from speculators.tiny.builders import build_tiny_verifier

    return build_tiny_verifier(
        tmp_path_factory.mktemp("tiny_llama_trained"), arch="llama", pretrain_steps=200
    )


@pytest.fixture(scope="session")
def public_speculators_python():
    """Python of a venv holding the PUBLIC `speculators` package (0.9.0), made once and reused.

    Created by bench/setup_public_venv.sh at $PUBLIC_VENV, else under $XDG_CACHE_HOME (default
    ~/.cache)/speculators-tests/public-venv; the script returns at once when it is ready.  Run
    it with `-P` from a neutral cwd and without PYTHONPATH so this checkout is not imported.
    """
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = Path(os.environ.get("PUBLIC_VENV") or cache / "speculators-tests" / "public-venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PUBLIC_VENV"] = str(venv)
    proc = subprocess.run(["bash", str(repo / "bench" / "setup_public_venv.sh")], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"could not create the public speculators venv at {venv}:\n{proc.stdout}\n{proc.stderr}")
    return str(venv / "bin" / "python")


@pytest.fixture(scope="session")
def hs_data(tiny_llama, tmp_path_factory):
    """12 synthetic hidden-state samples of 32 tokens from the tiny Llama (training tests)."""
    from tests.support.synthetic import write_synthetic_hidden_states

    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("hs_ckpt"), num_samples=12, seq_len=32)


# ============================================================ run store and worker settings
# (helper "runstore"): one SPEC_* home per test for the dashboard, worker and fault tests.

_SPEC_VARS = ("SPEC_DB_URL", "SPEC_DATA_ROOT", "SPEC_RUNS_ROOT", "SPEC_MODELS_ROOT", "SPEC_DEFAULT_MODEL",
              "SPEC_RESULT_BACKEND", "SPEC_BROKER_NAMESPACE", "SPEC_BROKER_URL", "SPEC_MAX_GPUS",
              "SPEC_REQUIRE_SHARED_ROOT")


@pytest.fixture()
def spec_home(monkeypatch):
    """`use(home, **variables)`: point the SPEC_* settings at `home`, set the given variables
    (`BROKER_URL=...` sets SPEC_BROKER_URL), unset the others so they follow the home, and
    return the Settings with their folders made. A test may call it again to switch homes."""
    from runstore.settings import Settings

    def use(home, **variables):
        for name in _SPEC_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SPEC_HOME", str(home))
        for name, value in variables.items():
            monkeypatch.setenv(f"SPEC_{name}", str(value))
        settings = Settings.from_env()
        settings.ensure_dirs()
        return settings

    return use
# ============================================================ end of the run store block


@pytest.fixture(scope="session")
def pg_database():
    """This session's PostgreSQL database (tests.support.pg), dropped at the end."""
    from tests.support.pg import SessionDatabase

    database = SessionDatabase()
    yield database
    database.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A run-store URL on each backend: a SQLite file, and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.sqlite'}"
    return request.getfixturevalue("pg_database").fresh_url()


@pytest.fixture(scope="session")
def shared_launch_vllm(tmp_path_factory):
    """One real `launch-vllm` server (tests.support.vllm_server.SharedLaunchVllm) for every module that
    reads hidden states from vLLM: a vLLM start costs a minute or more of CI, so it is made once."""
    from tests.support.vllm_server import SharedLaunchVllm, require_vllm, shared_verifier

    require_vllm()
    work = tmp_path_factory.mktemp("shared_launch_vllm")
    shared = SharedLaunchVllm(shared_verifier(work / "verifier"), work)
    yield shared
    shared.stop()
