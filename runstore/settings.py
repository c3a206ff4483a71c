"""Where things live and how the parts reach each other, read from the environment.

Every process (dashboard, GPU worker, vLLM controller) builds the same
`Settings` from `SPEC_*` variables, so compose.yaml and the local launcher only
have to set environment variables.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def default_namespace(home: Path) -> str:
    """`spec-<hash of the home>`: two installations on one Redis get different keys."""
    digest = hashlib.sha256(str(home.expanduser().resolve()).encode()).hexdigest()[:10]
    return f"spec-{digest}"


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    data_root: Path  # datasets a run may read: uploads and user files; nothing outside
    runs_root: Path  # one work directory per run: prepared data, hidden states, checkpoints, logs
    models_root: Path  # local verifier models (the tiny CPU model lives here)
    broker_url: str
    result_backend: str
    default_model: str
    max_gpus: int  # the form offers 0..max_gpus; 0 means CPU
    vllm_host: str  # host name the dashboard uses to reach servers the controller starts
    vllm_public_host: str  # host name shown to the user for the served endpoint
    vllm_port: int  # port of the served draft (checkpoint_best)
    verifier_port: int  # port of the verifier that online/hybrid training reads hidden states from
    auto_resume: bool  # a restarted worker resumes runs it was killed in
    train_threads: int  # OMP_NUM_THREADS for stage subprocesses
    broker_namespace: str  # prefix of every broker key: installations sharing a Redis never see each other's tasks
    vllm_bind: str  # --host for vLLM servers the controller starts ("" = the launcher's default, 127.0.0.1)
    vllm_api_key: str  # --api-key for those servers ("" = none)

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(_env("SPEC_HOME", str(Path.home() / ".speculators-app"))).expanduser()
        broker = _env("SPEC_BROKER_URL", "redis://127.0.0.1:6379/0")
        return cls(
            home=home,
            db_url=_env("SPEC_DB_URL", f"sqlite:///{home / 'runs.sqlite'}"),
            data_root=Path(_env("SPEC_DATA_ROOT", str(home / "data"))).expanduser(),
            runs_root=Path(_env("SPEC_RUNS_ROOT", str(home / "runs"))).expanduser(),
            models_root=Path(_env("SPEC_MODELS_ROOT", str(home / "models"))).expanduser(),
            broker_url=broker,
            result_backend=_env("SPEC_RESULT_BACKEND", broker if broker.startswith("redis") else f"file://{home / 'results'}"),
            default_model=_env("SPEC_DEFAULT_MODEL", str(home / "models" / "tiny-llama")),
            max_gpus=int(_env("SPEC_MAX_GPUS", "0")),
            vllm_host=_env("SPEC_VLLM_HOST", "127.0.0.1"),
            vllm_public_host=_env("SPEC_VLLM_PUBLIC_HOST", _env("SPEC_VLLM_HOST", "127.0.0.1")),
            vllm_port=int(_env("SPEC_VLLM_PORT", "8000")),
            verifier_port=int(_env("SPEC_VERIFIER_PORT", "8001")),
            auto_resume=_env("SPEC_AUTO_RESUME", "1") not in ("0", "false", "no"),
            train_threads=int(_env("SPEC_TRAIN_THREADS", "1")),
            broker_namespace=_env("SPEC_BROKER_NAMESPACE", default_namespace(home)),
            vllm_bind=_env("SPEC_VLLM_BIND_HOST", ""),
            vllm_api_key=_env("SPEC_VLLM_API_KEY", ""),
        )

    def ensure_dirs(self) -> None:
        for path in (self.home, self.data_root, self.runs_root, self.models_root):
            path.mkdir(parents=True, exist_ok=True)
