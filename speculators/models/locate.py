"""Find the speculator directory a user means: the directory itself or a train --save-path.

Lives below both `speculators.evaluate` and `speculators.vllm` so neither imports the other
for it (the arrow is vllm -> evaluate only).
"""

from __future__ import annotations

from pathlib import Path

from speculators.errors import UserError


def resolve_checkpoint(path: str | Path) -> Path:
    """A speculator dir, or a training ``--save-path`` (then its checkpoint_best / checkpoint_latest)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    for name in ("checkpoint_best", "checkpoint_latest"):
        if (path / name / "config.json").is_file():
            return (path / name).resolve()
    raise UserError(
        f"CHECKPOINT {path}: no config.json there nor in checkpoint_best/ or checkpoint_latest/; "
        "pass a directory written by `speculators train`"
    )
