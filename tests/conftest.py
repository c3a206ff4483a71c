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
    from speculators.testing.tiny import build_tiny_verifier

    return build_tiny_verifier(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Random-weight 8-layer Qwen3 (hidden 64) with a ChatML chat template."""
    from speculators.testing.tiny import build_tiny_verifier

    return build_tiny_verifier(tmp_path_factory.mktemp("tiny_qwen3"), arch="qwen3")


@pytest.fixture(scope="session")
def tiny_llama_trained(tmp_path_factory):
    """The tiny Llama after 200 steps on ShareGPT chat text: peaked, learnable outputs."""
    from speculators.testing.tiny import build_tiny_verifier

    return build_tiny_verifier(
        tmp_path_factory.mktemp("tiny_llama_trained"), arch="llama", pretrain_steps=200
    )


@pytest.fixture(scope="session")
def public_speculators_python():
    """Python of a separate venv holding the public `speculators==0.9.0` package.

    Made by bench/setup_public_venv.sh into a cached location (``$PUBLIC_VENV``, else
    ``~/.cache/speculators-tests/public-venv``) and reused across runs; the script returns
    at once when the venv is already there. Run it from a neutral directory with ``-P`` so
    this checkout's own `speculators` is not imported. Creating it needs the package index.
    """
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = Path(os.environ.get("PUBLIC_VENV") or Path.home() / ".cache" / "speculators-tests" / "public-venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["bash", str(root / "bench" / "setup_public_venv.sh")],
        env={**os.environ, "PUBLIC_VENV": str(venv)}, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"could not create the public speculators venv at {venv}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return str(venv / "bin" / "python")
