"""vLLM's hidden-state connector for CPU-only servers (loaded by vLLM, never by speculators).

vLLM's ``ExampleHiddenStatesConnector`` (0.32) copies each request's hidden states off
the GPU with CUDA streams, events and pinned host memory; on a CPU build the first
finished request kills the engine ("pin_memory=True requires a CUDA or other accelerator
backend"). This subclass keeps everything else (scheduling, file names, the writer lock
protocol, ``kv_transfer_params.hidden_states_path``) and replaces only that copy: on a CPU
KV cache the states are already in host memory, so they are gathered and written at once.

`speculators.vllm.launch.kv_transfer_config` selects it (``kv_connector_module_path``)
when there is no CUDA; GPU servers keep vLLM's own connector.
"""

from __future__ import annotations

import fcntl
import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    extract_from_kv_cache,
)


class _Done:
    """Stands where the parent keeps a CUDA event: the copy is already complete."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending) -> None:  # noqa: D401 - parent's hook
        if self._kv_cache is None or self._kv_cache.device.type != "cpu":
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return None
        block_size = self._block_size
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size, dtype=torch.long)[None, :]).flatten()
        num_tokens = int(pending.token_ids.shape[0])
        hidden = extract_from_kv_cache(self._kv_cache, slots, num_tokens).clone()
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            save_file({"hidden_states": hidden, "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the writer lock readers wait on
        self._req_copy_events[pending.req_id] = _Done()
        return None
