"""Which stages a run has and the exact command line of each.

Commands are argument lists built from validated `RunSettings`; nothing here
ever goes through a shell, so a run name like `x; rm -rf /` is just a string. A stage's
settings travel as a file in the run's folder (`<run>/settings/<stage>.json`, read back with
`speculators <command> --config FILE`), not as flags.
"""

from __future__ import annotations

import sys

from speculators.config.run import RunSettings
from speculators.config.stages import Rendezvous, StagePaths, stage_launch


def _cli(python: str) -> list[str]:
    return [python, "-m", "speculators"]


def stage_argv(spec: RunSettings, stage: str, paths: StagePaths, *, python: str = sys.executable,
               verifier_url: str | None = None, rendezvous: Rendezvous | None = None) -> list[str]:
    """The argument list that runs `stage` (not for `verifier`, which the worker does itself),
    after writing its settings file (`speculators.config.stages.stage_launch`); GPU training
    runs under torchrun, one trainer per GPU; one node of a multi-node train stage
    (`rendezvous`) runs torchrun with one trainer per GPU, or one on the CPU."""
    procs = spec.gpus if spec.gpus >= 1 else None
    return stage_launch(spec, stage, paths, python=python, torchrun_procs=procs, verifier_url=verifier_url,
                        rendezvous=rendezvous)


def verifier_argv(model: str, layer_ids: list[int], port: int, hidden_dir: str, *,
                  python: str = sys.executable, host: str = "127.0.0.1") -> list[str]:
    """`speculators launch-vllm` for the verifier that serves hidden states to online training;
    vLLM writes them under `hidden_dir`, on the volume the trainer reads. Chunked prefill is
    off, as vLLM 0.22's hidden-state extraction example runs it (docs/vllm.md)."""
    argv = _cli(python) + ["launch-vllm", model, "--hidden-states-path", hidden_dir]
    if layer_ids:
        argv += ["--target-layer-ids", *[str(i) for i in layer_ids]]
    return argv + ["--", "--host", host, "--port", str(port), "--no-enable-chunked-prefill"]


def serve_argv(checkpoint: str, port: int, *, python: str = sys.executable, host: str = "127.0.0.1",
               served_name: str | None = None, kv_cache_gib: int | None = None) -> list[str]:
    """`speculators serve` for a run's checkpoint; `served_name` is the model id clients send,
    `kv_cache_gib` the CPU KV cache (None: `speculators serve` decides)."""
    argv = _cli(python) + ["serve", checkpoint]
    if kv_cache_gib:
        argv += ["--kv-cache-gib", str(int(kv_cache_gib))]
    argv += ["--", "--host", host, "--port", str(port)]
    return argv + (["--served-model-name", served_name] if served_name else [])
