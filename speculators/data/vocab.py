"""Draft vocabulary: the D most frequent target tokens and the d2t / t2d tables.

``d2t[i] = target_id(i) - i`` (int64, length D): the offset vLLM adds to a draft
token id to get the target id. ``t2d`` is a bool mask over the target vocab that
is True exactly for the chosen ids. Draft ids are assigned in increasing target-id
order, so ``d2t`` is non-decreasing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from speculators.errors import UserError


def select_draft_tokens(freq: Mapping[int, int], draft_vocab_size: int, target_vocab_size: int) -> np.ndarray:
    """Target ids of the draft vocab, sorted ascending.

    Most frequent first; ties broken by the smaller id; if fewer than D ids were
    seen, the smallest unseen ids fill the rest.
    """
    if draft_vocab_size < 1:
        raise UserError(f"--draft-vocab-size must be >= 1, got {draft_vocab_size}")
    if draft_vocab_size > target_vocab_size:
        raise UserError(
            f"--draft-vocab-size {draft_vocab_size} is larger than the target vocab size "
            f"{target_vocab_size}; choose at most {target_vocab_size}"
        )
    for tid in freq:
        if not 0 <= int(tid) < target_vocab_size:
            raise UserError(
                f"token_freq has token id {tid} outside the target vocab [0, {target_vocab_size}); "
                "the frequencies come from a different tokenizer than --target-vocab-size/--target-model-path"
            )
    seen = sorted(((int(t), int(c)) for t, c in freq.items() if int(c) > 0), key=lambda tc: (-tc[1], tc[0]))
    chosen = [t for t, _ in seen[:draft_vocab_size]]
    if len(chosen) < draft_vocab_size:
        taken = set(chosen)
        for t in range(target_vocab_size):
            if len(chosen) == draft_vocab_size:
                break
            if t not in taken:
                chosen.append(t)
    return np.array(sorted(chosen), dtype=np.int64)


def build_mapping(chosen: np.ndarray, target_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(d2t, t2d)`` for sorted target ids ``chosen``."""
    d2t = (chosen - np.arange(len(chosen), dtype=np.int64)).astype(np.int64)
    t2d = np.zeros(target_vocab_size, dtype=bool)
    t2d[chosen] = True
    return d2t, t2d


def load_token_freq(path: str | Path) -> dict[int, int]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--token-freq-path {path}: file not found (prepare-data writes DIR/token_freq.pt)")
    try:
        freq = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--token-freq-path {path}: cannot be read ({type(exc).__name__})") from None
    if isinstance(freq, torch.Tensor):  # also accept a dense count vector
        freq = {i: int(c) for i, c in enumerate(freq.tolist()) if c}
    if not isinstance(freq, dict):
        raise UserError(f"--token-freq-path {path}: expected a dict token id -> count")
    return {int(k): int(v) for k, v in freq.items()}


def model_vocab_size(model_path: str) -> int:
    from speculators.verifier import config_int, read_verifier_config

    text = read_verifier_config(model_path, flag="--target-model-path")
    return config_int(text, "vocab_size", model_path, flag="--target-model-path")


def resolve_target_vocab_size(target_vocab_size: int | None, target_model_path: str | None) -> int:
    if target_vocab_size is None and target_model_path is None:
        raise UserError("give --target-vocab-size or --target-model-path")
    if target_model_path is not None:
        size = model_vocab_size(target_model_path)
        if target_vocab_size is not None and target_vocab_size != size:
            raise UserError(
                f"--target-vocab-size {target_vocab_size} disagrees with {target_model_path} "
                f"(vocab_size {size}); drop one of them"
            )
        return size
    if target_vocab_size < 1:  # type: ignore[operator]
        raise UserError(f"--target-vocab-size must be >= 1, got {target_vocab_size}")
    return int(target_vocab_size)  # type: ignore[arg-type]


def write_vocab_mapping(
    token_freq_path: str | Path,
    draft_vocab_size: int,
    output_path: str | Path,
    target_vocab_size: int | None = None,
    target_model_path: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    size = resolve_target_vocab_size(target_vocab_size, target_model_path)
    freq = load_token_freq(token_freq_path)
    chosen = select_draft_tokens(freq, draft_vocab_size, size)
    d2t, t2d = build_mapping(chosen, size)
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "d2t.npy", d2t)
    np.save(out / "t2d.npy", t2d)
    return d2t, t2d
