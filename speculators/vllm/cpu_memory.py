"""How much memory a vLLM server on the CPU may take for its KV cache.

vLLM's CPU backend (0.32, `vllm/v1/worker/cpu_worker.py`) reserves
``--gpu-memory-utilization`` (default 0.92) of ALL memory and refuses to start when less
than that is free ("Available memory on node 0 (19.6/23.54 GiB) on startup is less than
desired CPU memory utilization"): an ordinary machine with a browser open never passes.
``VLLM_CPU_KVCACHE_SPACE`` (whole GiB, read by `vllm/platforms/cpu.py` into
``kv_cache_memory_bytes``) skips that check; vLLM then only refuses a KV cache larger than
the memory available when it allocates it. So every server speculators starts without CUDA
gets that variable, chosen here from the memory that is free, unless the user set it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from speculators.errors import UserError

GIB = 1024**3
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
# What the automatic choice leaves alone: the OS and vLLM's own process (Python, torch, the
# API server, the engine process) take about 2 GiB on top of the weights.
RESERVE_GIB = 2.0
# Of what is left after the weights and the reserve, this share goes to the KV cache: other
# programs on the machine (a browser, a training run) keep the rest.
AUTO_FRACTION = 0.25
AUTO_MIN_GIB, AUTO_MAX_GIB = 1, 32
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _cgroup_room() -> int | None:
    """Bytes the container's memory limit still allows (cgroup v2, then v1), or None."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None
        return max(0, int(raw) - usage)
    return None


def available_bytes() -> int:
    """Memory free for a new server: the OS's `available` figure, capped by a container limit
    (vLLM compares against the same two)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def weights_bytes(paths: Iterable[str | os.PathLike | None]) -> int:
    """Bytes of weight files in local model directories (a hub id counts 0)."""
    total = 0
    for d in {Path(p).expanduser().resolve() for p in paths if p}:
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    return total


def auto_kv_cache_gib(available: int, weights: int) -> int:
    """A quarter of the memory left after the weights (counted twice: a bf16 checkpoint is
    served in float32 on the CPU) and a 2 GiB reserve, as whole GiB within [1, 32]."""
    left = available - 2 * weights - RESERVE_GIB * GIB
    return int(min(AUTO_MAX_GIB, max(AUTO_MIN_GIB, math.floor(left * AUTO_FRACTION / GIB))))


@dataclass(frozen=True)
class KvCacheChoice:
    gib: int | None  # None: leave the environment as it is (the user's own value, or a GPU)
    reason: str


def choose_kv_cache(requested: int | None, env: Mapping[str, str], cuda: bool,
                    model_paths: Iterable[str | os.PathLike | None] = (),
                    available: int | None = None) -> KvCacheChoice:
    """The one decision for every vLLM server speculators starts (serve, launch-vllm, the
    regenerate and datagen servers, the dashboard's controller): an explicit request
    (`--kv-cache-gib`, the dashboard's field), else the user's ``VLLM_CPU_KVCACHE_SPACE``,
    else automatic from free memory. On a GPU nothing is set."""
    if cuda:
        return KvCacheChoice(None, "GPU: vLLM sizes its KV cache with --gpu-memory-utilization")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise UserError(f"--kv-cache-gib must be a whole number of GiB >= 1 (vLLM reads {KV_ENV} as "
                            f"an integer), got {requested!r}")
        free = available_bytes() if available is None else available
        if requested * GIB > free:
            raise UserError(f"--kv-cache-gib {requested} is more than the {free / GIB:.1f} GiB of memory "
                            "available now; vLLM would refuse it. Choose a smaller value, or leave it "
                            "unset to size it from free memory")
        return KvCacheChoice(requested, f"{requested} GiB (requested)")
    own = env.get(KV_ENV, "").strip()
    if own:
        return KvCacheChoice(None, f"{own} GiB (from ${KV_ENV})")
    free = available_bytes() if available is None else available
    weights = weights_bytes(model_paths)
    gib = auto_kv_cache_gib(free, weights)
    return KvCacheChoice(gib, f"{gib} GiB (automatic: {free / GIB:.1f} GiB free, "
                              f"{weights / GIB:.2f} GiB of weights)")
