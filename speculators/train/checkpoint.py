"""Checkpoint layout, atomic checkpoint directories, `checkpoint_best`/`checkpoint_latest`, run guard.

`<save-path>/<epoch>/` is the checkpoint at the end of an epoch, `<save-path>/<epoch>-step<N>/`
one taken inside epoch `<epoch>` after global optimizer step `N` (`--checkpoint-every-steps`,
or on SIGTERM/SIGINT).  Each holds `config.json` + `model.safetensors` (loadable by
`vllm serve`), `optimizer_state_dict.pt`, `scheduler_state_dict.pt` and `trainer_state.pt`:
the training state map (speculators.train.state) the `Checkpointer` saves and restores.
A checkpoint is written under a temporary name and renamed into place, so a killed run
never leaves a half checkpoint that resume would pick up.  `checkpoint_latest` points at
the newest checkpoint, `checkpoint_best` at the epoch end with the best validation loss
(mid-epoch checkpoints are never validated, so never best); `--keep-last-checkpoints K`
deletes all but the newest K, never the best.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from speculators.atomic import atomic_symlink, atomic_write_json
from speculators.errors import UserError
from speculators.train.distributed import DistInfo, barrier

logger = logging.getLogger("speculators.train")

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer_state_dict.pt"
SCHEDULER_FILE = "scheduler_state_dict.pt"
TRAINER_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
BEST_LINK = "checkpoint_best"
LATEST_LINK = "checkpoint_latest"
CHECKPOINT_FILES = (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_FILE)

# Args that define the run: a save path holding a run that differs in any refuses to mix.
IDENTITY_ARGS = ("verifier_name_or_path", "num_layers", "draft_vocab_size", "ttt_steps", "total_seq_len", "algorithm",
                 "optimizer", "freeze_lm_head")  # (optimizer, freeze_lm_head: the saved optimizer state holds
# other parameters, so it does not load)
# What a run recorded before the arg existed did (its run.json lacks the key).
IDENTITY_DEFAULTS = {"freeze_lm_head": False}


_NAME = re.compile(r"^(\d+)(?:-step(\d+))?$")


def epoch_end_name(epoch: int) -> str:
    return str(epoch)


def mid_epoch_name(epoch: int, global_step: int) -> str:
    return f"{epoch}-step{global_step}"


def checkpoint_order(name: str) -> tuple[int, float] | None:
    """Sort key of a checkpoint directory name (None: not a checkpoint name).

    Mid-epoch checkpoints of epoch `e` sort by their step, before the end of `e`.
    """
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), float(m.group(2)) if m.group(2) is not None else math.inf


def is_epoch_end(path: Path) -> bool:
    return path.name.isdigit()


def checkpoint_dirs(save_path: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories (epoch ends and mid-epoch), oldest first."""
    root = Path(save_path)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if (
            p.is_dir() and not p.is_symlink() and checkpoint_order(p.name) is not None
            and all((p / f).is_file() for f in CHECKPOINT_FILES)
        ):
            out.append(p)
    return sorted(out, key=lambda p: checkpoint_order(p.name))


def epoch_dirs(save_path: str | os.PathLike) -> list[Path]:
    """Complete end-of-epoch directories, oldest first."""
    return [p for p in checkpoint_dirs(save_path) if is_epoch_end(p)]


def latest_checkpoint(save_path: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(save_path)
    return dirs[-1] if dirs else None


def prune_checkpoints(save_path: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0: keep all); never the best or latest.

    Returns the deleted directories.
    """
    if keep_last <= 0:
        return []
    root = Path(save_path)
    protected = {os.path.realpath(root / link) for link in (BEST_LINK, LATEST_LINK) if (root / link).is_symlink()}
    dirs = checkpoint_dirs(root)
    deleted = []
    for p in dirs[: max(0, len(dirs) - keep_last)]:
        if os.path.realpath(p) in protected:
            continue
        shutil.rmtree(p)
        deleted.append(p)
    return deleted


# ------------------------------------------------------------------ RNG state
def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ the state map on disk
# Where each entry of the training state map lives. `model` is written by the draft itself
# (config.json + model.safetensors, the layout vLLM reads); the entries in TRAINER_ENTRIES
# share trainer_state.pt as one flat dict (their keys are disjoint), the layout earlier
# releases wrote and read.
ENTRY_FILES = {"optimizer": OPTIMIZER_FILE, "scheduler": SCHEDULER_FILE}
TRAINER_ENTRIES = ("progress", "rng")


def write_checkpoint(save_path: str | os.PathLike, name: str, draft, state: dict[str, Any],
                     extra: dict[str, Any], is_best: bool) -> Path:
    """Write the state map as `<save-path>/<name>` atomically and move the symlinks.

    `extra` joins trainer_state.pt as information only (which run wrote it); resume ignores it.
    """
    if checkpoint_order(name) is None:
        raise ValueError(f"checkpoint name {name!r}: expected <epoch> or <epoch>-step<N>")
    root = Path(save_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    draft.save_pretrained(tmp, state["model"])
    for key, file in ENTRY_FILES.items():
        torch.save(state[key], tmp / file)
    trainer_state = dict(extra)
    for key in TRAINER_ENTRIES:
        trainer_state.update(state[key])
    torch.save(trainer_state, tmp / TRAINER_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_symlink(root / LATEST_LINK, final.name)
    if is_best:
        atomic_symlink(root / BEST_LINK, final.name)
    return final


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The state map `write_checkpoint` wrote into `directory` (each entry's state dict)."""
    from speculators.models.drafts import load_draft

    def load(file: str) -> Any:
        return torch.load(directory / file, map_location="cpu", weights_only=True)

    # The draft's own reader fills in what the vLLM layout leaves out (an identity vocab mapping).
    state: dict[str, Any] = {"model": load_draft(directory).state_dict()}
    state.update({key: load(file) for key, file in ENTRY_FILES.items()})
    trainer_state = load(TRAINER_FILE)
    state.update({key: trainer_state for key in TRAINER_ENTRIES})
    return state


class Checkpointer:
    """Saves and restores the training state map (`Stateful` objects by name) as one checkpoint.

    Every rank calls `save` (the full model and optimizer state are collectives under FSDP2);
    rank 0 writes, then everyone waits for it. `load` runs on every rank.
    """

    def __init__(self, save_path: str | os.PathLike, states: dict[str, Stateful], draft, run_id: str,
                 keep_last: int, info: DistInfo):
        self.save_path, self.states, self.draft = Path(save_path), states, draft
        self.run_id, self.keep_last, self.info = run_id, keep_last, info

    def save(self, name: str, is_best: bool) -> Path:
        state = {key: obj.state_dict() for key, obj in self.states.items()}
        path = self.save_path / name
        if self.info.is_main:
            write_checkpoint(self.save_path, name, self.draft, state, {"run_id": self.run_id}, is_best)
            for old in prune_checkpoints(self.save_path, self.keep_last):
                logger.info("--keep-last-checkpoints %d: deleted %s", self.keep_last, old, stacklevel=2)
        barrier(self.info)
        return path

    def load(self, directory: Path) -> None:
        state = read_checkpoint(directory)
        for key, obj in self.states.items():
            obj.load_state_dict(state[key])


# ------------------------------------------------------------------ run guard
def read_run(save_path: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(save_path) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); remove it or use another --save-path") from exc


def claim_save_path(save_path: str | os.PathLike, args: dict[str, Any], resume: bool) -> tuple[str, Path | None]:
    """Decide between a fresh run and a resume; refuse to write into another run's directory.

    Returns `(run_id, checkpoint_dir_to_resume_or_None)`.
    """
    root = Path(save_path)
    previous = read_run(root)
    latest = latest_checkpoint(root)
    has_ckpt = latest is not None or (root.is_dir() and any(checkpoint_order(p.name) is not None for p in root.iterdir()))
    if has_ckpt and not resume:
        raise UserError(
            f"--save-path {root} already holds checkpoints; pass another --save-path, delete them, "
            "or drop --no-resume-from-checkpoint to continue that run"
        )
    if previous is not None:
        old = previous.get("args", {})
        old = {**IDENTITY_DEFAULTS, **old}
        diff = [k for k in IDENTITY_ARGS if k in old and k in args and old[k] != args[k]]
        if diff:
            detail = ", ".join(f"{k}: {old[k]!r} there vs {args[k]!r} now" for k in diff)
            raise UserError(f"--save-path {root} belongs to another run ({detail}); choose another --save-path")
        if not resume and not has_ckpt:
            return uuid.uuid4().hex[:12], None
        return str(previous.get("run_id") or uuid.uuid4().hex[:12]), latest
    if has_ckpt:
        raise UserError(f"--save-path {root} holds checkpoints but no {RUN_FILE}; it is not a run of this tool")
    return uuid.uuid4().hex[:12], None


def write_run(save_path: str | os.PathLike, run_id: str, args: dict[str, Any]) -> None:
    atomic_write_json(Path(save_path) / RUN_FILE, {"run_id": run_id, "args": args}, default=str)
