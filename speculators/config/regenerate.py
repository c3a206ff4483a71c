"""`speculators regenerate`'s settings (assistant turns rewritten by the verifier), once.

`RegenConfig` is what `speculators.regenerate.runner.regenerate` reads; the command's flags,
the pipeline's regenerate stage (`speculators.config.stages`, used by the dashboard's worker
and by `speculators demo`) and the dashboard's `regenerate_*` fields derive from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from speculators.config.base import TypedSettings, setting
from speculators.config.prepare import MAX_SAMPLES


class RegenConfig(TypedSettings):
    model: str = setting(help="verifier model dir or HF id", min_length=1)
    data: list[str] = setting(help="conversation source as prepare-data takes it (sharegpt | ultrachat | "
                              "PATH.jsonl | PATH.json | HF id[:split]); repeat for several", repeat=True)
    output: str = setting(help="output .jsonl (appended to; a rerun resumes)", min_length=1)
    backend: Literal["transformers", "vllm"] = setting("transformers", "engine that regenerates",
                                                       title="Regeneration backend")
    endpoint: str | None = setting(None, "with --backend vllm: a running OpenAI-compatible server (default: start "
                                   "one)")
    api_key: str | None = setting(None, "bearer token for --endpoint")
    max_tokens: int = setting(256, "most tokens per regenerated turn", title="Regenerated reply tokens", ge=1,
                         le=1 << 20)
    temperature: float = setting(0.0, "sampling temperature (0: greedy)", title="Regeneration temperature",
                                ge=0.0, le=2.0)
    concurrency: int = setting(8, "conversations regenerated together (batch size / requests in flight)", ge=1,
                              le=4096)
    max_samples: int | None = setting(None, "regenerate at most this many conversations", ge=1,
                                      le=MAX_SAMPLES)
    seed: int = setting(0, "shuffle seed for choosing records (as prepare-data --seed) and sampling seed")
    max_turns: int | None = setting(None, "regenerate at most this many assistant turns per conversation (later "
                                    "turns dropped)", ge=1, le=10_000)
    max_prompt_tokens: int | None = setting(None, "a turn whose prompt is longer ends the conversation there (a "
                                            "first turn: record skipped)", ge=1, le=1 << 20)
    device: str = setting("auto", "transformers backend: auto, cpu or cuda[:N]")
    ready_timeout: float = setting(900.0, "seconds to wait for a started server", gt=0.0)
    summary_json: str | None = setting(None, "also write the summary here (JSON)")

    @model_validator(mode="after")
    def _endpoint_needs_vllm(self) -> RegenConfig:
        if self.endpoint and self.backend != "vllm":
            raise ValueError("--endpoint applies to --backend vllm; add --backend vllm")
        return self
