"""`speculators demo`'s settings: the run schema's fields at the demo's CPU-sized preset.

The demo is a preset of gen-and-train on the embedded tiny verifier: its sizes are
`RunSettings` fields (same bounds and help) starting from `DEMO_PRESET` rather than a
dashboard run's defaults, so the whole pipeline takes about two minutes on two cores.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic.fields import FieldInfo

from speculators.config.base import TypedSettings, from_field, setting
from speculators.config.gen_and_train import GenTrainConfig
from speculators.config.run import RunSettings

# The demo's sizes: 256 ShareGPT conversations of 256 tokens, a 256-token draft vocabulary, 4 epochs
# at lr 3e-3, 16 held-out eval prompts; one regenerated turn of at most 96 tokens per conversation.
DEMO_PRESET: dict[str, Any] = {"max_samples": 256, "seq_length": 256, "draft_vocab_size": 256, "epochs": 4,
                               "ttt_steps": 3, "lr": 3e-3, "eval_prompts": 16, "regen_max_tokens": 96,
                               "regen_max_turns": 1, "regen_concurrency": 64}


def _preset(model: type, name: str, field: str | None = None) -> FieldInfo:
    """`model`'s field (`field`, default `name`) starting from the demo's preset value for `name`
    (listed with the demo's other options)."""
    meta = {**model.model_fields[field or name].json_schema_extra, "group": "", "flag": None}
    return from_field(model, field or name, default=DEMO_PRESET[name], json_schema_extra=meta)


class DemoConfig(TypedSettings):
    workdir: str = setting("demo-output", "where every stage writes (reused on rerun)")
    model: str | None = setting(None, "verifier path (default: a tiny Llama built into WORKDIR/verifier)")
    max_samples: int = _preset(RunSettings, "max_samples")
    seq_length: int = _preset(RunSettings, "seq_length")
    draft_vocab_size: int = _preset(RunSettings, "draft_vocab_size")
    epochs: int = _preset(RunSettings, "epochs")
    ttt_steps: int = _preset(RunSettings, "ttt_steps")
    lr: float = _preset(RunSettings, "lr")
    eval_prompts: int = _preset(GenTrainConfig, "eval_prompts")
    regenerate: bool = setting(True, "train on the verifier's own replies (speculators regenerate) instead of "
                               "ShareGPT's")
    regen_backend: Literal["auto", "transformers", "vllm"] = setting(
        "auto", "backend of the regenerate stage (auto: vllm when importable, the serving path users run; in "
        "float32 its replies equal the transformers backend's)")
    regen_max_tokens: int = _preset(RunSettings, "regen_max_tokens", "regenerate_max_tokens")
    regen_max_turns: int = _preset(RunSettings, "regen_max_turns", "regenerate_max_turns")
    regen_concurrency: int = _preset(RunSettings, "regen_concurrency", "regenerate_concurrency")
    vllm_eval: bool | None = setting(None, "also measure acceptance in a real vLLM server (default: when vLLM is "
                                     "importable)")
    vllm_ready_timeout: float = setting(900.0, "seconds to wait for the vLLM server", gt=0.0)
