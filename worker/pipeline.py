"""Which stages a run has and the exact command line of each.

Commands are argument lists built from a validated `RunSpec`; nothing here
ever goes through a shell, so a run name like `x; rm -rf /` is just a string.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from worker.spec import RunSpec

STAGES = {
    "offline": ["prepare", "vocab", "datagen", "train"],
    # online/hybrid: the verifier stage makes sure a vLLM server that returns hidden states is up
    "online": ["prepare", "vocab", "verifier", "train"],
    "hybrid": ["prepare", "vocab", "verifier", "train"],
}

@dataclass(frozen=True)
class RunPaths:
    work_dir: Path

    @property
    def prepared(self) -> Path:
        return self.work_dir / "prepared"

    @property
    def vocab(self) -> Path:
        return self.work_dir / "vocab"

    @property
    def hidden(self) -> Path:
        return self.work_dir / "hidden_states"

    @property
    def checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.checkpoints / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.work_dir / "logs"

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"


def stages_for(spec: RunSpec) -> list[str]:
    return list(STAGES[spec.mode])


def _cli(python: str) -> list[str]:
    return [python, "-m", "speculators"]


def stage_argv(spec: RunSpec, stage: str, paths: RunPaths, *, python: str = sys.executable,
               verifier_url: str | None = None) -> list[str]:
    """The argument list that runs `stage` (not for `verifier`, which the worker does itself)."""
    if stage == "prepare":
        return _cli(python) + [
            "prepare-data", "--model", spec.model, "--data", spec.dataset, "--output", str(paths.prepared),
            "--max-samples", str(spec.max_samples), "--seq-length", str(spec.seq_length), "--seed", str(spec.seed),
        ]
    if stage == "vocab":
        return _cli(python) + [
            "build-vocab-mapping", "--token-freq-path", str(paths.prepared / "token_freq.pt"),
            "--draft-vocab-size", str(spec.draft_vocab_size), "--target-model-path", spec.model,
            "--output-path", str(paths.vocab),
        ]
    if stage == "datagen":
        argv = _cli(python) + [
            "datagen", "--target-model-path", spec.model, "--train-data-path", str(paths.prepared),
            "--output-dir", str(paths.hidden), "--batch-size", str(spec.batch_size),
            "--max-samples", str(spec.max_samples),
        ]
        if spec.layer_ids:
            argv += ["--layer-ids", *[str(i) for i in spec.layer_ids]]
        return argv
    if stage == "train":
        args = [
            "--verifier-name-or-path", spec.model, "--data-path", str(paths.hidden),
            "--save-path", str(paths.checkpoints), "--epochs", str(spec.epochs), "--lr", repr(float(spec.lr)),
            "--ttt-steps", str(spec.ttt_steps), "--num-layers", str(spec.num_layers),
            "--d2t-path", str(paths.vocab / "d2t.npy"), "--t2d-path", str(paths.vocab / "t2d.npy"),
            "--draft-vocab-size", str(spec.draft_vocab_size), "--total-seq-len", str(spec.seq_length),
            "--run-name", spec.name,
        ]
        if spec.mode in ("online", "hybrid"):
            url = spec.vllm_endpoint or verifier_url
            if not url:
                raise ValueError("online/hybrid training needs the verifier's URL")
            args += ["--vllm-endpoint", url, "--on-missing", "generate",
                     "--on-generate", "delete" if spec.mode == "online" else "cache",
                     "--hidden-states-path", str(paths.hidden)]
        if spec.gpus >= 1:
            # torchrun (torch.distributed.run) starts one trainer per GPU.
            return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.gpus),
                    "-m", "speculators.train", *args]
        return _cli(python) + ["train", *args]
    raise ValueError(f"stage {stage!r} has no command")


def verifier_argv(model: str, layer_ids: list[int], port: int, hidden_dir: str, *,
                  python: str = sys.executable, host: str = "127.0.0.1") -> list[str]:
    """`speculators launch-vllm` for the verifier that serves hidden states to online training;
    vLLM writes them under `hidden_dir`, on the volume the trainer reads. Chunked prefill is
    off, as vLLM 0.22's hidden-state extraction example runs it (docs/vllm.md)."""
    argv = _cli(python) + ["launch-vllm", model, "--hidden-states-path", hidden_dir]
    if layer_ids:
        argv += ["--target-layer-ids", *[str(i) for i in layer_ids]]
    return argv + ["--", "--host", host, "--port", str(port), "--no-enable-chunked-prefill"]


def serve_argv(checkpoint: str, port: int, *, python: str = sys.executable, host: str = "127.0.0.1") -> list[str]:
    return _cli(python) + ["serve", checkpoint, "--", "--host", host, "--port", str(port)]
