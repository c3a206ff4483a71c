"""`speculators gen-and-train`'s settings: the whole pipeline for any verifier, from one schema.

The pipeline's own settings are the run schema's fields (`RunSettings`, themselves the stage
commands' fields), so a default or a bound is the one the dashboard and the single commands
use; a few more come straight from the stage command they feed (datagen's backend and vLLM
sizes, the trainer's tracker and step checkpoints). The same schema is read from flags and
from a `--config` file (YAML or JSON, keys = field names; flags given override the file).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from speculators.config.base import TypedSettings, from_field, setting
from speculators.config.datagen import DatagenConfig
from speculators.config.run import RunSettings
from speculators.config.train import TrainConfig

PIPE, DATA, REGEN, DATAGEN, VOCAB, TRAIN, EVAL = (
    "pipeline", "data (prepare)", "regenerate", "hidden states (datagen)", "vocab", "training", "eval")


def _field(model: type, name: str, group: str, **override: Any) -> FieldInfo:
    """`model`'s field `name` under this command's help `group` (default, bounds, help kept)."""
    meta = dict(copy.deepcopy(model.model_fields[name].json_schema_extra) or {})
    meta["group"] = group
    return from_field(model, name, json_schema_extra=meta, **override)


class GenTrainConfig(TypedSettings):
    model: str = _field(RunSettings, "model", PIPE, description="verifier (target) model: a Hugging Face id "
                        "or a local model directory")
    data: str = _field(RunSettings, "dataset", PIPE, description="conversations: sharegpt, ultrachat, a local "
                       ".jsonl/.json file or a Hugging Face dataset id")
    work_dir: str = setting("output", "where every stage writes, with its record (pipeline.json) and logs; a "
                            "rerun continues there", group=PIPE, min_length=1)
    name: str | None = setting(None, "run name given to the trainer (default: the work directory's name)",
                               group=PIPE, min_length=1, max_length=100)

    max_samples: int = _field(RunSettings, "max_samples", DATA)
    seq_length: int = _field(RunSettings, "seq_length", DATA)
    seed: int = _field(RunSettings, "seed", DATA)

    regenerate: bool = _field(RunSettings, "regenerate", REGEN)
    regenerate_backend: Literal["transformers", "vllm"] = _field(RunSettings, "regenerate_backend", REGEN)
    regenerate_max_tokens: int = _field(RunSettings, "regenerate_max_tokens", REGEN)
    regenerate_temperature: float = _field(RunSettings, "regenerate_temperature", REGEN)
    regenerate_max_turns: int | None = _field(RunSettings, "regenerate_max_turns", REGEN)
    regenerate_max_prompt_tokens: int | None = _field(RunSettings, "regenerate_max_prompt_tokens", REGEN)
    regenerate_concurrency: int = _field(RunSettings, "regenerate_concurrency", REGEN)

    layer_ids: list[int] = _field(RunSettings, "layer_ids", DATAGEN)
    batch_size: int = _field(RunSettings, "batch_size", DATAGEN)
    datagen_backend: Literal["transformers", "vllm"] = _field(DatagenConfig, "backend", DATAGEN)
    tensor_parallel_size: int = _field(DatagenConfig, "tensor_parallel_size", DATAGEN)
    gpu_memory_utilization: float = _field(DatagenConfig, "gpu_memory_utilization", DATAGEN)

    draft_vocab_size: int = _field(RunSettings, "draft_vocab_size", VOCAB)

    epochs: int = _field(RunSettings, "epochs", TRAIN)
    lr: float = _field(RunSettings, "lr", TRAIN)
    ttt_steps: int = _field(RunSettings, "ttt_steps", TRAIN)
    num_layers: int = _field(RunSettings, "num_layers", TRAIN)
    total_seq_len: int | None = _field(RunSettings, "total_seq_len", TRAIN)
    nproc_per_node: int = setting(1, "training processes (one per GPU); more than 1 trains under torchrun "
                                  "(FSDP2)", group=TRAIN, ge=1, le=64)
    logger: Literal["trackio", "wandb", "tensorboard"] | None = _field(TrainConfig, "logger", TRAIN)
    checkpoint_every_steps: int = _field(TrainConfig, "checkpoint_every_steps", TRAIN)

    eval: bool = setting(True, "measure the acceptance length of the best checkpoint on held-out "
                         "conversations of --data (those after the --max-samples trained on)", group=EVAL)
    eval_prompts: int = setting(64, "held-out prompts the eval stage decodes", group=EVAL, ge=1)

    @property
    def work_path(self) -> Path:
        """The work directory as an absolute path (the stages' commands name absolute paths)."""
        return Path(self.work_dir).expanduser().absolute()

    def run_settings(self) -> RunSettings:
        """The pipeline as the run schema the stage builder reads (offline: hidden states on disk)."""
        # eval_prompts is the eval stage's prompt count here, not the trainer's acceptance probe
        shared = {n: getattr(self, n) for n in RunSettings.model_fields if n in type(self).model_fields
                  and n not in ("name", "model", "eval_prompts")}
        return RunSettings(name=self.name or self.work_path.name, model=self.model, dataset=self.data,
                           mode="offline", **shared)

    def stage_extra(self, stage: str) -> dict[str, Any]:
        """Settings of a stage's command beyond the run schema; only those off the command's default,
        so a run that keeps them has the same command lines as the dashboard's."""
        wanted = {"datagen": (DatagenConfig, {"backend": self.datagen_backend,
                                              "tensor_parallel_size": self.tensor_parallel_size,
                                              "gpu_memory_utilization": self.gpu_memory_utilization}),
                  "train": (TrainConfig, {"logger": self.logger})}  # checkpoint_every_steps: a run setting
        if stage not in wanted:
            return {}
        model, values = wanted[stage]
        return {k: v for k, v in values.items() if v != model.model_fields[k].get_default(call_default_factory=True)}


# The public package's `gen_and_train.py` is configured by editing the arguments section of the
# script itself and then run with no arguments; ours reads this file from the working directory
# when no --config is given (`speculators.config.files.parse_args`), so the same habit (edit, then
# `speculators gen-and-train`) works.
DEFAULT_CONFIG_NAMES = ("gen_and_train.yaml", "gen_and_train.yml", "gen_and_train.json")
