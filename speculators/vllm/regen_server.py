"""A plain vLLM chat server for `regenerate` when no --endpoint is given.

The command comes from the one vLLM command builder (`launch.build_vllm_command`: entry
module, ``VLLM_TARGET_DEVICE=cpu`` without CUDA, 127.0.0.1). Here only what a chat
server for regeneration adds: a free port, the seed, and on the CPU eager mode, each
unless the user set it (flags after `--`). The CPU KV cache size is the builder's, as for
every server (`cpu_memory.choose_kv_cache`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

from speculators.vllm.launch import VllmCommand, flag_value, has_cuda, build_vllm_command

logger = logging.getLogger(__name__)


def chat_server_command(model: str, vllm_args: Sequence[str], port: int, seed: int, cpu: bool) -> VllmCommand:
    """vLLM's OpenAI server for MODEL on a local port with a fixed seed; eager mode on the CPU."""
    args = list(vllm_args)
    if flag_value(args, ["--port"]) is None:
        args += ["--port", str(port)]
    if flag_value(args, ["--seed"]) is None:
        args += ["--seed", str(seed)]
    if cpu and "--enforce-eager" not in args:
        args.append("--enforce-eager")
    return build_vllm_command(model, args)


@contextlib.contextmanager
def started_chat_server(model: str, vllm_args: Sequence[str], ready_timeout_s: float,
                        seed: int = 0) -> Iterator[str]:
    """Start the server, yield its base URL once it is ready, stop it (and its children) after."""
    from speculators.vllm.readiness import ManagedServer, free_port

    cmd = chat_server_command(model, vllm_args, free_port(), seed, cpu=not has_cuda())
    kv = f"; KV cache {cmd.kv_cache}" if cmd.kv_cache and not cmd.kv_cache.startswith("GPU") else ""
    logger.info("regenerate: starting %s (ready in 1-3 minutes on a CPU%s)", " ".join(cmd.argv), kv)
    with ManagedServer(cmd.argv, cmd.url, ready_timeout_s, env=cmd.env):
        yield cmd.url
