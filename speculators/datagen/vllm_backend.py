"""The `vllm` datagen backend: hidden states from a vLLM server, same files as `transformers`.

A thin adapter: it starts `vllm serve` the way `speculators launch-vllm` does
(``extract_hidden_states`` + ``ExampleHiddenStatesConnector`` writing to a private
temp directory, with ``--tensor-parallel-size``, ``--gpu-memory-utilization``,
``--max-model-len`` and the datagen passthrough args), then sends each batch as
concurrent token-id completion requests through `speculators.vllm.client`, reads
the per-request files and deletes them. vLLM batches concurrent requests itself.

To use a server that is already running instead (e.g. one `launch-vllm` started
with the same layer ids and a directory this machine can read), set
``SPECULATORS_VLLM_ENDPOINT=http://host:port``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from speculators.datagen.base import GeneratorSpec, HiddenStateGenerator
from speculators.errors import UserError

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "SPECULATORS_VLLM_ENDPOINT"
READY_TIMEOUT_ENV = "SPECULATORS_VLLM_READY_TIMEOUT"


def server_args(spec: GeneratorSpec, port: int) -> list[str]:
    """vLLM engine flags from the datagen options (the passthrough args come last and win)."""
    args = ["--port", str(port), "--tensor-parallel-size", str(spec.tensor_parallel_size),
            "--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.dtype != "auto":
        args += ["--dtype", spec.dtype]
    return args + list(spec.extra_args)


class VllmGenerator(HiddenStateGenerator):
    def __init__(self, spec: GeneratorSpec, endpoint: str | None = None, max_concurrency: int = 64):
        from speculators.datagen.runner import read_model_shape
        from speculators.vllm.client import ClientConfig, HiddenStatesClient
        from speculators.vllm.hs_files import write_server_info
        from speculators.vllm.launch import HiddenStatesLaunch, api_key_from_env
        from speculators.vllm.readiness import ManagedServer
        from speculators.vllm.retry import RetryPolicy

        self.num_hidden_layers, self.hidden_size = read_model_shape(spec.model_path)
        self.layer_ids = list(spec.layer_ids)
        self._server: ManagedServer | None = None
        self._tmp: str | None = None
        self.max_concurrency = max_concurrency
        api_key = api_key_from_env()
        if endpoint is None:
            from speculators.vllm.readiness import free_port

            port = free_port()
            self._tmp = tempfile.mkdtemp(prefix="speculators-vllm-hs-")
            launch = HiddenStatesLaunch(spec.model_path, self.layer_ids, self._tmp, server_args(spec, port))
            write_server_info(self._tmp, spec.model_path, self.layer_ids)
            cmd = launch.build(api_key=api_key)
            endpoint = cmd.url
            logger.info("datagen vllm: starting %s", " ".join(cmd.argv))
            self._server = ManagedServer(cmd.argv, endpoint, float(os.environ.get(READY_TIMEOUT_ENV, 1800)),
                                         env=cmd.env, api_key=api_key)
            try:
                self._server.start()
            except BaseException:
                self.close()
                raise
        self.endpoint = endpoint
        self.client = HiddenStatesClient(
            ClientConfig(endpoint=endpoint, request_timeout_s=600.0, num_layers=len(self.layer_ids),
                         layer_ids=self.layer_ids, api_key=api_key, retry=RetryPolicy(max_wait_s=600.0))
        )
        self.client.model()

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "endpoint": self.endpoint, "managed_server": self._server is not None}

    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        if not batch:
            return []
        workers = max(1, min(len(batch), self.max_concurrency))
        with ThreadPoolExecutor(workers, thread_name_prefix="vllm-datagen") as pool:
            stacked = list(pool.map(lambda ids: self.client.fetch(list(ids)), batch))
        return [list(hs.unbind(1)) for hs in stacked]

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def create(spec: GeneratorSpec) -> VllmGenerator:
    endpoint = getattr(spec, "vllm_endpoint", None) or os.environ.get(ENDPOINT_ENV)
    if spec.device not in ("auto", "cuda") and not spec.device.startswith("cuda"):
        raise UserError(f"--device {spec.device}: the vllm backend runs on the GPUs vLLM sees (drop --device)")
    return VllmGenerator(spec, endpoint)
