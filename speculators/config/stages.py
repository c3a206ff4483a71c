"""The pipeline's command lines, built once from a run's settings.

`speculators demo` and the dashboard's worker both take their stage commands from
`stage_args`: regenerate (optional) -> prepare -> vocab -> datagen (offline) -> train.
Each is a `speculators` subcommand's argument list; values go as `--flag=value` so no
value (a run name like `-x`) can be read as a flag, and nothing passes through a shell.
The train stage's flags come from a `TrainConfig` (`train_config_for`), so they carry the
trainer's own names and checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from speculators.config.base import to_argv
from speculators.config.run import RunSettings
from speculators.config.train import TrainConfig


@dataclass(frozen=True)
class StagePaths:
    """Where each stage of one run writes, under its work directory."""

    work_dir: Path

    @property
    def regenerated(self) -> Path:
        return self.work_dir / "regenerated.jsonl"

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


def pipeline_stages(run: RunSettings) -> list[str]:
    """Stage names in order; `verifier` (online/hybrid) is the worker's own step, not a command."""
    head = ["regenerate"] if run.regenerate else []
    middle = ["verifier"] if run.online else ["datagen"]
    return head + ["prepare", "vocab", *middle, "train"]


def train_config_for(run: RunSettings, paths: StagePaths, verifier_url: str | None = None) -> TrainConfig:
    """The trainer's settings for this run (checked like `speculators train`'s flags)."""
    values = dict(
        verifier_name_or_path=run.model, data_path=str(paths.hidden), save_path=str(paths.checkpoints),
        epochs=run.epochs, lr=run.lr, ttt_steps=run.ttt_steps, num_layers=run.num_layers,
        d2t_path=str(paths.vocab / "d2t.npy"), t2d_path=str(paths.vocab / "t2d.npy"),
        draft_vocab_size=run.draft_vocab_size, total_seq_len=run.packed_len, seed=run.seed, run_name=run.name,
    )
    if run.online:
        url = run.vllm_endpoint or verifier_url
        if not url:
            raise ValueError("online/hybrid training needs the verifier's URL")
        values.update(vllm_endpoint=url, on_missing="generate",
                      on_generate="delete" if run.mode == "online" else "cache",
                      hidden_states_path=str(paths.hidden), prepared_data=str(paths.prepared))
        if run.layer_ids:
            values["vllm_layer_ids"] = list(run.layer_ids)
    return TrainConfig(**values)


def stage_args(run: RunSettings, stage: str, paths: StagePaths, *, verifier_url: str | None = None) -> list[str]:
    """The `speculators` subcommand and flags that run `stage`."""
    if stage == "regenerate":
        return ["regenerate", f"--model={run.model}", f"--data={run.dataset}", f"--output={paths.regenerated}",
                f"--backend={run.regenerate_backend}", f"--max-tokens={run.regenerate_max_tokens}",
                f"--temperature={run.regenerate_temperature!r}", f"--max-samples={run.max_samples}",
                f"--seed={run.seed}"]
    if stage == "prepare":
        data = paths.regenerated if run.regenerate else run.dataset
        return ["prepare-data", f"--model={run.model}", f"--data={data}", f"--output={paths.prepared}",
                f"--max-samples={run.max_samples}", f"--seq-length={run.seq_length}", f"--seed={run.seed}"]
    if stage == "vocab":
        return ["build-vocab-mapping", f"--token-freq-path={paths.prepared / 'token_freq.pt'}",
                f"--draft-vocab-size={run.draft_vocab_size}", f"--target-model-path={run.model}",
                f"--output-path={paths.vocab}"]
    if stage == "datagen":
        argv = ["datagen", f"--target-model-path={run.model}", f"--train-data-path={paths.prepared}",
                f"--output-dir={paths.hidden}", f"--batch-size={run.batch_size}", f"--max-samples={run.max_samples}"]
        if run.layer_ids:
            argv += ["--layer-ids", *[str(i) for i in run.layer_ids]]
        return argv
    if stage == "train":
        return ["train", *to_argv(train_config_for(run, paths, verifier_url))]
    raise ValueError(f"stage {stage!r} has no command")
