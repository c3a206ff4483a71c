"""A plain `vllm serve MODEL` for `regenerate` when no --endpoint is given.

On a machine without CUDA the CPU build of vLLM needs ``VLLM_TARGET_DEVICE=cpu``,
eager mode and a bounded KV cache; those are set unless the user set them
(environment, or flags after `--`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from speculators.vllm.launch import _flag_value, serve_command, vllm_command_prefix


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def chat_server_command(prefix: Sequence[str], model: str, vllm_args: Sequence[str], port: int,
                        seed: int, cpu: bool) -> list[str]:
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
    return serve_command(prefix, model, args)


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
    cmd = chat_server_command(vllm_command_prefix(), model, vllm_args, free_port(), seed, cpu)
    url = endpoint_from_args(cmd[cmd.index("serve") + 2:])
    print(f"regenerate: starting {' '.join(cmd)} (ready in 1-3 minutes on a CPU)", flush=True)
    server = ManagedServer(cmd, url, ready_timeout_s, env=chat_server_env(cpu))
    with server:
        yield url
