"""A draft's weights file, shared by every draft kind (EAGLE-3, DFlash): the tensors under the
names vLLM loads, written and read as one safetensors file beside config.json."""

from __future__ import annotations

from pathlib import Path

import torch

from speculators.errors import UserError

WEIGHTS_NAME = "model.safetensors"


def is_identity_mapping(d2t: torch.Tensor | None, t2d: torch.Tensor | None, vocab_size: int) -> bool:
    """True when draft id ``i`` is verifier id ``i`` for the whole verifier vocabulary."""
    if d2t is None or t2d is None:
        return False
    return (
        d2t.numel() == vocab_size
        and t2d.numel() == vocab_size
        and not bool(d2t.ne(0).any())
        and bool(t2d.bool().all())
    )


def export_tensors(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: rotary buffers left out, and an identity vocab mapping
    (draft vocab == verifier vocab) too: vLLM creates no ``draft_id_to_target_id`` then and
    refuses a ``d2t`` tensor."""
    out = {k: v.detach().contiguous() for k, v in state.items() if not k.startswith("rotary.")}
    if is_identity_mapping(out.get("d2t"), out.get("t2d"), vocab_size):
        out.pop("d2t", None)
        out.pop("t2d", None)
    return out


def write_weights(directory: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`directory/model.safetensors` (the directory is made); returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_weights(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file's path and tensors; a directory without it is refused naming the file."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; the checkpoint directory must hold {WEIGHTS_NAME}")
    return path, load_file(str(path), device=str(map_location))
