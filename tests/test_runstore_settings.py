"""runstore.settings: SPEC_* variables read by pydantic-settings, paths following SPEC_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runstore.settings import Settings

VARS = ("HOME", "DB_URL", "DATA_ROOT", "RUNS_ROOT", "MODELS_ROOT", "BROKER_URL", "RESULT_BACKEND", "DEFAULT_MODEL",
        "MAX_GPUS", "VLLM_HOST", "VLLM_PUBLIC_HOST", "VLLM_PORT", "VERIFIER_PORT", "AUTO_RESUME", "TRAIN_THREADS")


@pytest.fixture()
def env(monkeypatch):
    for v in VARS:
        monkeypatch.delenv(f"SPEC_{v}", raising=False)
    return monkeypatch


def test_defaults_follow_home(env, tmp_path):
    env.setenv("SPEC_HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.home == tmp_path
    assert s.db_url == f"sqlite:///{tmp_path / 'runs.sqlite'}"
    assert (s.data_root, s.runs_root, s.models_root) == (tmp_path / "data", tmp_path / "runs", tmp_path / "models")
    assert s.broker_url == "redis://127.0.0.1:6379/0" and s.result_backend == s.broker_url
    assert s.default_model == str(tmp_path / "models" / "tiny-llama")
    assert (s.max_gpus, s.vllm_host, s.vllm_public_host, s.vllm_port, s.verifier_port) == (0, "127.0.0.1",
                                                                                          "127.0.0.1", 8000, 8001)
    assert s.auto_resume is True and s.train_threads == 1


def test_every_variable_is_read(env, tmp_path):
    values = {"HOME": str(tmp_path / "h"), "DB_URL": "sqlite:///x.db", "DATA_ROOT": str(tmp_path / "d"),
              "RUNS_ROOT": str(tmp_path / "r"), "MODELS_ROOT": str(tmp_path / "m"), "BROKER_URL": "filesystem://",
              "RESULT_BACKEND": "file:///tmp/res", "DEFAULT_MODEL": "org/model", "MAX_GPUS": "2",
              "VLLM_HOST": "vllm", "VLLM_PUBLIC_HOST": "example.org", "VLLM_PORT": "9000", "VERIFIER_PORT": "9001",
              "AUTO_RESUME": "0", "TRAIN_THREADS": "3"}
    for k, v in values.items():
        env.setenv(f"SPEC_{k}", v)
    s = Settings.from_env()
    assert (s.home, s.data_root, s.runs_root, s.models_root) == tuple(
        Path(values[k]) for k in ("HOME", "DATA_ROOT", "RUNS_ROOT", "MODELS_ROOT"))
    assert (s.db_url, s.broker_url, s.result_backend, s.default_model) == (
        "sqlite:///x.db", "filesystem://", "file:///tmp/res", "org/model")
    assert (s.max_gpus, s.vllm_host, s.vllm_public_host, s.vllm_port, s.verifier_port, s.train_threads) == (
        2, "vllm", "example.org", 9000, 9001, 3)
    assert s.auto_resume is False


def test_empty_variables_count_as_unset_and_derived_values_follow(env, tmp_path):
    env.setenv("SPEC_HOME", str(tmp_path))
    env.setenv("SPEC_MAX_GPUS", "")
    env.setenv("SPEC_BROKER_URL", "filesystem://")
    env.setenv("SPEC_VLLM_HOST", "vllm")
    s = Settings.from_env()
    assert s.max_gpus == 0
    assert s.result_backend == f"file://{tmp_path / 'results'}"  # not Redis: results on disk
    assert s.vllm_public_host == "vllm"
    for off in ("false", "no", "0"):
        env.setenv("SPEC_AUTO_RESUME", off)
        assert Settings.from_env().auto_resume is False
    env.setenv("SPEC_AUTO_RESUME", "1")
    assert Settings.from_env().auto_resume is True


def test_a_bad_number_names_the_variable(env):
    env.setenv("SPEC_MAX_GPUS", "two")
    with pytest.raises(ValidationError, match="max_gpus"):
        Settings.from_env()
