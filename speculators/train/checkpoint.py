"""Checkpoint layout, atomic epoch directories, `checkpoint_best`/`checkpoint_latest`, run guard.

`<save-path>/<epoch>/` holds `config.json` + `model.safetensors` (loadable by `vllm serve`),
`optimizer_state_dict.pt`, `scheduler_state_dict.pt` and `trainer_state.pt`.  An epoch
directory is written under a temporary name and renamed into place, so a killed run
never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculators.errors import UserError

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
IDENTITY_ARGS = ("verifier_name_or_path", "num_layers", "draft_vocab_size", "ttt_steps", "total_seq_len")


def epoch_dirs(save_path: str | os.PathLike) -> list[Path]:
    """Complete epoch directories, oldest first."""
    root = Path(save_path)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink() and p.name.isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            out.append(p)
    return sorted(out, key=lambda p: int(p.name))


def latest_checkpoint(save_path: str | os.PathLike) -> Path | None:
    dirs = epoch_dirs(save_path)
    return dirs[-1] if dirs else None


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


# ------------------------------------------------------------------ symlinks
def _point(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def write_checkpoint(
    save_path: str | os.PathLike,
    epoch: int,
    draft,
    draft_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    is_best: bool,
) -> Path:
    """Write `<save-path>/<epoch>` atomically and move the symlinks."""
    root = Path(save_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(epoch)
    tmp = root / f".tmp-{epoch}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    draft.save_pretrained(tmp, draft_state)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(scheduler_state, tmp / SCHEDULER_FILE)
    torch.save(trainer_state, tmp / TRAINER_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(root / LATEST_LINK, final.name)
    if is_best:
        _point(root / BEST_LINK, final.name)
    return final


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_optimizer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_scheduler_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / SCHEDULER_FILE, map_location="cpu", weights_only=True)


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
    has_ckpt = latest is not None or (root.is_dir() and any(p.name.isdigit() for p in root.iterdir()))
    if has_ckpt and not resume:
        raise UserError(
            f"--save-path {root} already holds checkpoints; pass another --save-path, delete them, "
            "or drop --no-resume-from-checkpoint to continue that run"
        )
    if previous is not None:
        old = previous.get("args", {})
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
    root = Path(save_path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "args": args}, indent=2, default=str) + "\n")
    os.replace(tmp, root / RUN_FILE)
