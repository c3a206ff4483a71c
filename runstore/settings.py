"""Where things live and how the parts reach each other, read from the environment.

Every process (dashboard, GPU worker, vLLM controller) builds the same `Settings`
from `SPEC_*` variables (pydantic-settings reads and type-checks them; an empty
variable counts as unset), so compose.yaml and the local launcher only have to set
environment variables. Paths left unset follow `SPEC_HOME`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


#: The file the main host keeps in its runs root; a joining worker finds it there when the
#: shared root is mounted (docs/scaling.md).
ROOT_MARKER = ".speculators-root"


def default_namespace(home: Path) -> str:
    """`spec-<hash of the home>`: two installations on one Redis get different keys."""
    digest = hashlib.sha256(str(home.expanduser().resolve()).encode()).hexdigest()[:10]
    return f"spec-{digest}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPEC_", env_ignore_empty=True, frozen=True, extra="ignore",
                                      populate_by_name=True)

    home: Path = Path.home() / ".speculators-app"
    db_url: str = ""  # default sqlite:///<home>/runs.sqlite
    data_root: Path | None = None  # datasets a run may read: uploads and user files; nothing outside
    runs_root: Path | None = None  # one work directory per run: prepared data, hidden states, checkpoints, logs
    models_root: Path | None = None  # local verifier models (the tiny CPU model lives here)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""  # default: the broker when it is Redis, else files under home
    default_model: str = ""  # default <home>/models/tiny-llama
    max_gpus: int = 0  # the form offers 0..max_gpus; 0 means CPU
    vllm_host: str = "127.0.0.1"  # host name the dashboard uses to reach servers the controller starts
    vllm_public_host: str = ""  # host name shown to the user for the served endpoint (default vllm_host)
    vllm_port: int = 8000  # port of the served draft (checkpoint_best)
    verifier_port: int = 8001  # port of the verifier that online/hybrid training reads hidden states from
    auto_resume: bool = True  # a restarted worker resumes runs it was killed in
    train_threads: int = 1  # OMP_NUM_THREADS for stage subprocesses
    # prefix of every broker key: installations sharing a Redis never see each other's tasks
    broker_namespace: str = ""  # default spec-<hash of home>
    # --host for vLLM servers the controller starts ("" = the launcher's default, 127.0.0.1)
    vllm_bind: str = Field("", validation_alias=AliasChoices("vllm_bind", "SPEC_VLLM_BIND_HOST"))
    vllm_api_key: str = ""  # --api-key for those servers ("" = none)
    # GiB of KV cache for a draft served on the CPU (VLLM_CPU_KVCACHE_SPACE); 0 = chosen from
    # free memory (speculators.vllm.cpu_memory), the dashboard's serve field overrides it
    vllm_kv_cache_gib: int = Field(0, ge=0, le=1024)
    # A worker joining an installation from another host: its runs root is the shared one
    # (NFS), which it must find mounted (the marker file the main host writes) and never creates
    require_shared_root: bool = False
    # Multi-node runs: the address the other nodes reach this worker's trainers and torchrun's
    # rendezvous at ("" = its host name), and how long node 0 waits for the other nodes'
    # workers before the stage fails saying how many joined
    worker_address: str = ""
    nodes_wait_s: float = Field(1800.0, gt=0)

    @field_validator("home", "data_root", "runs_root", "models_root", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("auto_resume", "require_shared_root", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, str):
            return True
        return value

    @model_validator(mode="after")
    def _follow_home(self) -> Settings:
        home = self.home
        derived = {
            "db_url": self.db_url or f"sqlite:///{home / 'runs.sqlite'}",
            "data_root": self.data_root or home / "data",
            "runs_root": self.runs_root or home / "runs",
            "models_root": self.models_root or home / "models",
            "result_backend": self.result_backend
            or (self.broker_url if self.broker_url.startswith("redis") else f"file://{home / 'results'}"),
            "default_model": self.default_model or str(home / "models" / "tiny-llama"),
            "vllm_public_host": self.vllm_public_host or self.vllm_host,
            "broker_namespace": self.broker_namespace or default_namespace(home),
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)  # frozen: filled once, while validating
        return self

    @classmethod
    def from_env(cls) -> Settings:
        return cls()

    def ensure_dirs(self) -> None:
        """Create the folders this process uses. The main host (require_shared_root off) also
        marks its runs root (ROOT_MARKER), so a joining worker can tell the shared root from
        an empty mount point; a joining worker creates only its own home."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.require_shared_root:
            return
        for path in (self.data_root, self.runs_root, self.models_root):
            path.mkdir(parents=True, exist_ok=True)
        marker = self.runs_root / ROOT_MARKER
        if not marker.exists():
            marker.write_text(f"{self.broker_namespace}\n", encoding="utf-8")
