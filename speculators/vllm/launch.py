"""Build and run `vllm serve` command lines.

Hidden-state export uses vLLM's own mechanism (vLLM >= 0.22, see docs/vllm.md):
the ``extract_hidden_states`` speculative method, which caches the chosen layers'
hidden states, plus the ``ExampleHiddenStatesConnector`` KV connector, which writes
them per request to ``shared_storage_path``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Sequence

from speculators.errors import UserError

VLLM_BIN_ENV = "SPECULATORS_VLLM_BIN"

# vLLM flags our builders own; passing them after `--` would silently fight ours.
_OWNED_FLAGS = {
    "--speculative-config",
    "--speculative_config",
    "--kv-transfer-config",
    "--kv_transfer_config",
}


def speculative_config(layer_ids: Sequence[int]) -> dict:
    """vLLM ``--speculative-config`` selecting the hidden-state extraction method."""
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [int(i) for i in layer_ids]}},
    }


def kv_transfer_config(hidden_states_path: str) -> dict:
    """vLLM ``--kv-transfer-config`` for the file-writing hidden-state connector."""
    return {
        "kv_connector": "ExampleHiddenStatesConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(hidden_states_path)},
    }


def vllm_command_prefix(vllm_bin: str | None = None) -> list[str]:
    """How to invoke vLLM's CLI: ``--vllm-bin``, ``$SPECULATORS_VLLM_BIN``, ``vllm`` on PATH,
    or ``python -m vllm.entrypoints.cli.main`` when vllm is importable."""
    explicit = vllm_bin or os.environ.get(VLLM_BIN_ENV)
    if explicit:
        resolved = shutil.which(explicit)
        if resolved is None:
            raise UserError(f"--vllm-bin / ${VLLM_BIN_ENV} {explicit!r} is not an executable")
        return [resolved]
    on_path = shutil.which("vllm")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    raise UserError(
        "vLLM is not installed here: install it on a CUDA host (`pip install 'vllm>=0.22'`), "
        "or point --vllm-bin at its `vllm` executable"
    )


def check_passthrough(vllm_args: Sequence[str]) -> None:
    """Refuse vLLM flags this command sets itself."""
    for arg in vllm_args:
        flag = arg.split("=", 1)[0]
        if flag in _OWNED_FLAGS:
            raise UserError(
                f"{flag} after `--` conflicts with the one speculators sets; drop it "
                "(use --target-layer-ids / --hidden-states-path instead)"
            )


@dataclass
class HiddenStatesLaunch:
    """Everything `launch-vllm` needs to start a hidden-state server."""

    model: str
    layer_ids: list[int]
    hidden_states_path: str
    vllm_args: list[str] = field(default_factory=list)

    def command(self, prefix: Sequence[str]) -> list[str]:
        check_passthrough(self.vllm_args)
        return [
            *prefix,
            "serve",
            self.model,
            "--speculative-config",
            json.dumps(speculative_config(self.layer_ids)),
            "--kv-transfer-config",
            json.dumps(kv_transfer_config(self.hidden_states_path)),
            *self.vllm_args,
        ]


def serve_command(prefix: Sequence[str], model_dir: str, vllm_args: Sequence[str]) -> list[str]:
    """``vllm serve SPECULATOR_DIR ...``: vLLM reads the verifier from the speculator's config."""
    return [*prefix, "serve", str(model_dir), *vllm_args]


def _flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def endpoint_from_args(vllm_args: Sequence[str]) -> str:
    """The URL a client should use, from the ``--host``/``--port`` passed to vLLM (default :8000)."""
    port = _flag_value(vllm_args, ["--port"]) or "8000"
    host = _flag_value(vllm_args, ["--host"]) or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    try:
        int(port)
    except ValueError:
        raise UserError(f"--port {port!r} after `--` is not a number") from None
    return f"http://{host}:{port}"


def served_model_name(model: str, vllm_args: Sequence[str]) -> str:
    """The model id clients must send (``--served-model-name`` or the model argument)."""
    return _flag_value(vllm_args, ["--served-model-name", "--served_model_name"]) or model
