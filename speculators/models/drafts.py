"""Which draft class a checkpoint directory holds, by its ``speculators_model_type``."""

from __future__ import annotations

from pathlib import Path

import torch

from speculators.errors import UserError

ALGORITHMS = ("eagle3", "dflash")


def algorithm_of(directory: str | Path) -> str:
    """``eagle3`` or ``dflash`` from ``config.json`` (a missing/other type reads as eagle3, whose
    loader then names the problem)."""
    from speculators.models.dflash.config import speculators_model_type

    kind = speculators_model_type(directory)
    return kind if kind in ALGORITHMS else "eagle3"


def load_draft(directory: str | Path, map_location: str | torch.device = "cpu"):
    """The draft model saved in ``directory`` (EAGLE-3 or DFlash)."""
    if algorithm_of(directory) == "dflash":
        from speculators.models.dflash import DFlashDraftModel

        return DFlashDraftModel.from_pretrained(directory, map_location)
    from speculators.models.eagle3 import Eagle3DraftModel

    return Eagle3DraftModel.from_pretrained(directory, map_location)


def check_algorithm(directory: str | Path, asked: str) -> None:
    """A checkpoint resumed or loaded with --from-pretrained must be of the asked algorithm."""
    found = algorithm_of(directory)
    if found != asked:
        raise UserError(f"{directory}: the checkpoint is a {found} draft, --algorithm asks for {asked}; "
                        f"pass --algorithm {found}")
