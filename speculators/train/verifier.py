"""The few verifier pieces training needs, read straight from its safetensors files.

The draft copies the verifier's token embedding, and the training targets are the
verifier's next-token distribution: final norm + lm_head applied to the saved last-layer
hidden state.  Loading the whole verifier for that would waste memory, so we open the
safetensors shards and read only those tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speculators.errors import UserError

_EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
_NORM_NAMES = ("model.norm.weight", "model.language_model.norm.weight", "norm.weight")
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def load_verifier_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--verifier-name-or-path {name_or_path!r}: cannot load its config.json ({exc}); "
            "pass a local model directory or a reachable Hugging Face id"
        ) from exc
    return getattr(config, "text_config", None) or config


def _resolve_dir(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise UserError(f"--verifier-name-or-path {name_or_path!r}: no local directory and download failed ({exc})") from exc


def _weight_index(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in mapping.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{directory}: no model.safetensors(.index.json); the verifier must be saved as safetensors")


def _read(index: dict[str, Path], candidates: tuple[str, ...]) -> torch.Tensor | None:
    from safetensors import safe_open

    for name in candidates:
        if name in index:
            with safe_open(str(index[name]), framework="pt") as f:
                return f.get_tensor(name)
    return None


def load_verifier_weights(name_or_path: str, config: Any) -> dict[str, torch.Tensor]:
    """Return `embed`, `norm`, `lm_head` tensors (lm_head falls back to tied embeddings)."""
    directory = _resolve_dir(name_or_path)
    index = _weight_index(directory)
    embed = _read(index, _EMBED_NAMES)
    norm = _read(index, _NORM_NAMES)
    lm_head = _read(index, _LM_HEAD_NAMES)
    if lm_head is None and getattr(config, "tie_word_embeddings", False):
        lm_head = embed
    missing = [n for n, t in (("embed_tokens", embed), ("final norm", norm), ("lm_head", lm_head)) if t is None]
    if missing:
        raise UserError(f"{directory}: verifier weights lack {', '.join(missing)}; is this a causal LM checkpoint?")
    return {"embed": embed.float(), "norm": norm.float(), "lm_head": lm_head.float()}


class VerifierHead(nn.Module):
    """Frozen final norm + lm_head restricted to the draft vocabulary (rows picked by t2d).

    Held as buffers so FSDP leaves them whole and the optimizer never sees them.
    """

    def __init__(self, norm_weight: torch.Tensor, lm_head_rows: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("norm_weight", norm_weight.detach().clone())
        self.register_buffer("weight", lm_head_rows.detach().clone())
        self.eps = eps

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], t2d: torch.Tensor, eps: float) -> VerifierHead:
        return cls(weights["norm"], weights["lm_head"][t2d.bool()], eps)

    def forward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` verifier final-layer states -> `[N, draft_vocab]` float32 logits."""
        x = last_hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm_weight * x) @ self.weight.t()
