"""Serve a trained speculator with `vllm serve`.

vLLM recognizes a speculator directory by ``speculators_model_type`` in its
``config.json`` and loads the verifier named in
``speculators_config.verifier.name_or_path``; the number of speculative tokens
comes from ``speculators_config.proposal_methods[0].speculative_tokens``.

vLLM 0.33 and later refuse a speculator whose verifier is a local directory
(``maybe_override_with_speculators``: "Speculators verifier must name a remote model
repository"; read in 0.34.0's source and run in tests/test_vllm_034.py); there the verifier
is served explicitly, with the speculator as ``--speculative-config``. `serve_plan` picks the
form from the installed version.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speculators.errors import UserError
from speculators.models.locate import resolve_checkpoint

__all__ = ["resolve_checkpoint", "read_speculator_config", "serve_plan", "chat_instructions"]

SUPPORTED_TYPES = ("eagle3", "dflash")  # vLLM methods of the same names
# Supported vLLM range (pyproject's `datagen` extra, scripts/install_vllm.py and docs/vllm.md say the same).
MIN_VLLM = (0, 22)
MAX_VLLM_EXCLUSIVE = (0, 35)
# First vLLM that refuses a local verifier inside a speculator config.
LOCAL_VERIFIER_REFUSED_FROM = (0, 33)


def parse_version(version: str) -> tuple[int, int]:
    """``"0.32.0"`` / ``"0.33.1rc2+cpu"`` -> ``(0, 32)`` / ``(0, 33)``."""
    import re

    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    if not m:
        raise UserError(f"cannot read the vLLM version {version!r}; reinstall vLLM (`make vllm`)")
    return int(m.group(1)), int(m.group(2))


def supported_requirement() -> str:
    """The range as a pip requirement: ``vllm>=0.22,<0.35``."""
    lo = ".".join(map(str, MIN_VLLM))
    hi = ".".join(map(str, MAX_VLLM_EXCLUSIVE))
    return f"vllm>={lo},<{hi}"


def check_supported(version: str) -> tuple[int, int]:
    """Refuse a vLLM outside the supported range, naming what to install."""
    v = parse_version(version)
    if not MIN_VLLM <= v < MAX_VLLM_EXCLUSIVE:
        raise UserError(f"vLLM {version} is not supported: install {supported_requirement()} (`make vllm`)")
    return v


@dataclass(frozen=True)
class ServePlan:
    """What `vllm serve` gets: the model argument and the flags speculators adds."""

    model: str
    args: list[str]
    explicit: bool  # True: verifier as the model, speculator as --speculative-config


def serve_plan(checkpoint: Path, info: dict[str, Any], vllm_version: str) -> ServePlan:
    """The speculator dir itself on vLLM < 0.33 (or a remote verifier); on 0.33+ with a
    local verifier, ``VERIFIER --speculative-config {"model": CKPT, "method": "eagle3", ...}``."""
    v = check_supported(vllm_version)
    verifier = info["verifier"]
    local = Path(verifier).expanduser().exists()
    if local and v >= LOCAL_VERIFIER_REFUSED_FROM:
        spec = {"model": str(checkpoint), "method": info.get("config", {}).get("speculators_model_type", "eagle3"),
                "num_speculative_tokens": int(info["num_speculative_tokens"])}
        return ServePlan(str(Path(verifier).expanduser().resolve()), ["--speculative-config", json.dumps(spec)], True)
    return ServePlan(str(checkpoint), [], False)


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
