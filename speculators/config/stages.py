"""The pipeline's command lines, built once from a run's settings.

`speculators gen-and-train`, `speculators demo` and the dashboard's worker take their stage
commands from `stage_args`: regenerate (optional) -> prepare -> vocab -> datagen (offline) ->
train, then `eval_args`; `launch_argv` turns one into the process to start (torchrun for
multi-process training), `stage_launch` the worker's process, which reads its settings from
a file (`--config`) instead. `STAGE_INPUTS` says which stages' outputs each stage reads (what
gen-and-train redoes when one of them changed).
Each stage's settings are the subcommand's own typed config (`stage_config`: RegenConfig,
PrepareConfig, VocabConfig, DatagenConfig, TrainConfig), checked as the command checks
them, and written out by the schema (`speculators.config.base`) as `--flag=value`, so no
value (a run name like `-x`) can be read as a flag; nothing passes through a shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from speculators.config.base import explicit_argv, to_argv
from speculators.config.datagen import DatagenConfig
from speculators.config.files import write_settings_file
from speculators.config.prepare import PrepareConfig
from speculators.config.regenerate import RegenConfig
from speculators.config.run import RunSettings
from speculators.config.train import TrainConfig
from speculators.config.vocab import VocabConfig
from speculators.errors import UserError

# stage -> the `speculators` subcommand that runs it
COMMANDS = {"regenerate": "regenerate", "prepare": "prepare-data", "vocab": "build-vocab-mapping",
            "datagen": "datagen", "train": "train"}

# stage -> the stages whose outputs it reads (vocab and datagen both read only prepare's output,
# so their order does not matter; `verifier` is the worker's online hidden-state server)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "regenerate": (), "prepare": ("regenerate",), "vocab": ("prepare",), "datagen": ("prepare",),
    "verifier": ("prepare",), "train": ("vocab", "datagen", "verifier"), "eval": ("train",),
}


@dataclass(frozen=True)
class StagePaths:
    """Where each stage of one run writes, under its work directory."""

    work_dir: Path

    @property
    def regenerated(self) -> Path:
        return self.work_dir / "regenerated.jsonl"

    @property
    def regenerate_summary(self) -> Path:
        return self.work_dir / "regenerate_summary.json"

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

    @property
    def eval_report(self) -> Path:
        return self.work_dir / "eval.json"

    @property
    def eval_streams(self) -> Path:
        return self.work_dir / "streams_pytorch.jsonl"

    def settings(self, stage: str) -> Path:
        """The settings file the worker hands `stage`'s command (`--config`)."""
        return self.work_dir / "settings" / f"{stage}.json"

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    def outputs(self, stage: str) -> list[Path]:
        """What `stage` writes (its log aside): what a redo of the stage supersedes."""
        return {"regenerate": [self.regenerated, self.regenerate_summary], "prepare": [self.prepared],
                "vocab": [self.vocab], "datagen": [self.hidden], "train": [self.checkpoints],
                "eval": [self.eval_report, self.eval_streams]}.get(stage, [])


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
    # The run's own training options (acceptance, checkpoints, algorithm, optimizer, loss) are
    # set only where they differ from the trainer's default: left at it, they stay free for the
    # `extra` train flags gen-and-train passes through (`stage_config` refuses a clash).
    options = dict(
        eval_every_steps=run.eval_every_steps, eval_prompts=run.eval_prompts, eval_max_tokens=run.eval_max_tokens,
        eval_data=run.eval_data or None, best_by=run.best_by, checkpoint_every_steps=run.checkpoint_every_steps,
        algorithm=run.algorithm, optimizer=run.optimizer, loss=run.loss,
        gradient_checkpointing=run.gradient_checkpointing, freeze_lm_head=run.freeze_lm_head,
    )
    values.update({k: v for k, v in options.items() if v != TrainConfig.model_fields[k].default})
    if run.online:
        url = run.vllm_endpoint or verifier_url
        if not url:
            raise ValueError("online/hybrid training needs the verifier's URL")
        values.update(vllm_endpoint=url, on_missing="generate",
                      on_generate="delete" if run.mode == "online" else "cache",
                      hidden_states_path=str(paths.hidden), prepared_data=str(paths.prepared),
                      hidden_states_dtype=run.hidden_states_dtype)
        if run.layer_ids:
            values["vllm_layer_ids"] = list(run.layer_ids)
    return TrainConfig(**values)


def stage_config(run: RunSettings, stage: str, paths: StagePaths, *, verifier_url: str | None = None,
                 extra: dict[str, Any] | None = None) -> BaseModel:
    """The typed settings of the subcommand that runs `stage` (checked like its flags);
    `extra`: more of that command's settings (e.g. datagen's backend), none the run sets itself."""
    cfg = _stage_config(run, stage, paths, verifier_url)
    if not extra:
        return cfg
    clash = sorted(set(extra) & cfg.model_fields_set)
    if clash:
        raise UserError(f"{stage}: {', '.join(clash)} is set from the pipeline's own settings "
                        "(the run's flags and the work directory's layout); change those instead")
    given = {k: getattr(cfg, k) for k in cfg.model_fields_set}
    return type(cfg)(**given, **extra)


def _stage_config(run: RunSettings, stage: str, paths: StagePaths, verifier_url: str | None) -> BaseModel:
    if stage == "regenerate":
        return RegenConfig(
            model=run.model, data=[run.dataset], output=str(paths.regenerated), backend=run.regenerate_backend,
            max_samples=run.max_samples, max_tokens=run.regenerate_max_tokens, max_turns=run.regenerate_max_turns,
            temperature=run.regenerate_temperature, concurrency=run.regenerate_concurrency, seed=run.seed,
            max_prompt_tokens=run.regenerate_max_prompt_tokens, summary_json=str(paths.regenerate_summary))
    if stage == "prepare":
        data = str(paths.regenerated) if run.regenerate else run.dataset
        # prepare-data's cache key names the data file, not the replies in it: rebuild after a regeneration
        rebuild = {"force": True} if run.regenerate else {}
        return PrepareConfig(model=run.model, data=data, output=str(paths.prepared), max_samples=run.max_samples,
                             seq_length=run.seq_length, seed=run.seed, **rebuild)
    if stage == "vocab":
        return VocabConfig(token_freq_path=str(paths.prepared / "token_freq.pt"),
                           draft_vocab_size=run.draft_vocab_size, target_model_path=run.model,
                           output_path=str(paths.vocab))
    if stage == "datagen":
        layers = {"layer_ids": list(run.layer_ids)} if run.layer_ids else {}
        return DatagenConfig(target_model_path=run.model, train_data_path=str(paths.prepared),
                             output_dir=str(paths.hidden), batch_size=run.batch_size, max_samples=run.max_samples,
                             hidden_states_dtype=run.hidden_states_dtype, **layers)
    if stage == "train":
        return train_config_for(run, paths, verifier_url)
    raise ValueError(f"stage {stage!r} has no command")


def stage_args(run: RunSettings, stage: str, paths: StagePaths, *, verifier_url: str | None = None,
               extra: dict[str, Any] | None = None) -> list[str]:
    """The `speculators` subcommand and flags that run `stage`: the flags the builder chose,
    for train the values that differ from the trainer's defaults."""
    cfg = stage_config(run, stage, paths, verifier_url=verifier_url, extra=extra)
    flags = to_argv(cfg) if stage == "train" else explicit_argv(cfg)
    return [COMMANDS[stage], *flags]


def stage_launch(run: RunSettings, stage: str, paths: StagePaths, *, python: str,
                 torchrun_procs: int | None = None, verifier_url: str | None = None,
                 rendezvous: Rendezvous | None = None) -> list[str]:
    """The process that runs `stage` with its settings handed over as a file: the stage's typed
    settings (`stage_config`) are written to `paths.settings(stage)` and the command reads them
    back with `--config` (`speculators.config.files`), one schema on both sides."""
    cfg = stage_config(run, stage, paths, verifier_url=verifier_url)
    path = write_settings_file(paths.settings(stage), cfg)
    return launch_argv([COMMANDS[stage], "--config", str(path)], python=python, torchrun_procs=torchrun_procs,
                       rendezvous=rendezvous)


def eval_args(run: RunSettings, paths: StagePaths, *, num_prompts: int) -> list[str]:
    """`speculators eval` of the best checkpoint on held-out conversations of the run's dataset:
    the same source, seed and sequence length as prepare, past the `max_samples` trained on."""
    return ["eval", "--checkpoint", str(paths.checkpoints / "checkpoint_best"), "--verifier", run.model,
            "--data", run.dataset, "--num-speculative-tokens", str(run.ttt_steps),
            "--num-prompts", str(num_prompts), "--skip-samples", str(run.max_samples),
            "--data-seed", str(run.seed), "--seq-length", str(run.seq_length),
            "--output-json", str(paths.eval_report), "--output-streams", str(paths.eval_streams)]


@dataclass(frozen=True)
class Rendezvous:
    """How one node of a multi-node train stage joins the others: torchrun's c10d rendezvous
    on node 0 (`endpoint`, host:port), `nnodes` nodes in all, `rdzv_id` unique per attempt.
    Node 0 hosts the rendezvous store (`is_host`), so the others never race to host it when
    two nodes share an address (one machine standing in for two); `local_addr` is the address
    this node's trainers are reached at (None: torchrun looks up the host name)."""

    nnodes: int
    endpoint: str
    rdzv_id: str
    is_host: bool
    local_addr: str | None = None

    def torchrun_args(self) -> list[str]:
        args = ["--nnodes", str(self.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.rdzv_id, "--rdzv-conf", f"is_host={'1' if self.is_host else '0'}"]
        return args + (["--local-addr", self.local_addr] if self.local_addr else [])


def launch_argv(args: list[str], *, python: str, torchrun_procs: int | None = None,
                rendezvous: Rendezvous | None = None) -> list[str]:
    """The process that runs `speculators ARGS`: `python -m speculators ...`, or for `train` with
    `torchrun_procs` set, torchrun (torch.distributed.run) starting that many trainers: on this
    machine alone (`--standalone`), or with `rendezvous` as one node of several (torchrun's c10d
    rendezvous assigns the node ranks; `--node-rank` is only read by its static rendezvous)."""
    if args[0] == "train" and rendezvous is not None:
        return [python, "-m", "torch.distributed.run", *rendezvous.torchrun_args(),
                "--nproc_per_node", str(torchrun_procs or 1), "-m", "speculators.train", *args[1:]]
    if args[0] == "train" and torchrun_procs:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun_procs),
                "-m", "speculators.train", *args[1:]]
    return [python, "-m", "speculators", *args]
