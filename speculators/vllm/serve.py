"""Serve a trained speculator with `vllm serve`.

vLLM recognizes a speculator directory by ``speculators_model_type`` in its
``config.json`` and loads the verifier named in
``speculators_config.verifier.name_or_path``; the number of speculative tokens
comes from ``speculators_config.proposal_methods[0].speculative_tokens``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from speculators.errors import UserError

SUPPORTED_TYPES = ("eagle3",)


def resolve_checkpoint(path: str | Path) -> Path:
    """A speculator dir, or a training ``--save-path`` (then its checkpoint_best / checkpoint_latest)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    for name in ("checkpoint_best", "checkpoint_latest"):
        if (path / name / "config.json").is_file():
            return (path / name).resolve()
    raise UserError(
        f"CHECKPOINT {path}: no config.json there nor in checkpoint_best/ or checkpoint_latest/; "
        "pass a directory written by `speculators train`"
    )


def read_speculator_config(checkpoint: Path) -> dict[str, Any]:
    """Load and check the fields vLLM requires; raise `UserError` naming the missing one."""
    cfg_path = checkpoint / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path} is not valid JSON: {exc}") from exc
    kind = cfg.get("speculators_model_type")
    if kind not in SUPPORTED_TYPES:
        raise UserError(
            f"{cfg_path}: speculators_model_type is {kind!r}, expected one of {SUPPORTED_TYPES}; "
            "is this a speculator checkpoint?"
        )
    spec = cfg.get("speculators_config")
    try:
        k = spec["proposal_methods"][0]["speculative_tokens"]
        verifier = spec["verifier"]["name_or_path"]
    except (KeyError, IndexError, TypeError):
        raise UserError(
            f"{cfg_path}: needs speculators_config.proposal_methods[0].speculative_tokens and "
            "speculators_config.verifier.name_or_path (vLLM rejects it otherwise)"
        ) from None
    if not isinstance(cfg.get("transformer_layer_config"), dict):
        raise UserError(f"{cfg_path}: transformer_layer_config must be a dict")
    if not verifier:
        raise UserError(f"{cfg_path}: speculators_config.verifier.name_or_path is empty")
    if str(verifier).startswith(("/", "./", "../", "~")) and not Path(verifier).expanduser().exists():
        raise UserError(
            f"{cfg_path}: verifier {verifier!r} does not exist on this machine; vLLM loads the verifier "
            "from there (edit speculators_config.verifier.name_or_path)"
        )
    return {"config": cfg, "num_speculative_tokens": int(k), "verifier": str(verifier)}


def chat_instructions(base_url: str, model_id: str) -> str:
    """How to talk to the server, printed once it is ready."""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64})
    return "\n".join([
        f"vLLM is serving {model_id} with speculative decoding at {base_url}",
        "chat with it:",
        f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        f"  vllm chat --url {base_url}/v1",
        f"acceptance metrics: speculators eval --vllm-endpoint {base_url} --output-json report.json",
    ])
