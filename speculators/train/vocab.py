"""Load and check the draft <-> verifier vocabulary mapping (`d2t.npy`, `t2d.npy`).

`d2t[i]` is an offset: draft id `i` is verifier id `i + d2t[i]`; `t2d` is a bool mask over
the verifier vocabulary marking the ids the draft can emit.  The two must describe the
same sorted id list, or vLLM would map draft tokens to the wrong verifier tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from speculators.errors import UserError


def identity_mapping(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(vocab_size, dtype=torch.long), torch.ones(vocab_size, dtype=torch.bool)


def _load_npy(path: Path, flag: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; run `speculators build-vocab-mapping` or fix the path")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{flag} {path}: not a readable .npy file ({exc})") from exc


def check_mapping(d2t: torch.Tensor, t2d: torch.Tensor, verifier_vocab: int, draft_vocab_size: int | None) -> None:
    """Raise UserError when the mapping is inconsistent with itself or with the sizes."""
    if t2d.ndim != 1 or t2d.shape[0] != verifier_vocab:
        raise UserError(
            f"--t2d-path: has {tuple(t2d.shape)} entries but the verifier vocabulary has {verifier_vocab}; "
            "rebuild it with `speculators build-vocab-mapping` for this verifier"
        )
    n = int(t2d.sum())
    if d2t.ndim != 1 or d2t.shape[0] != n:
        raise UserError(f"--d2t-path has {tuple(d2t.shape)} entries but --t2d-path selects {n} ids; they must come from the same build")
    if draft_vocab_size is not None and n != draft_vocab_size:
        raise UserError(
            f"--draft-vocab-size {draft_vocab_size} disagrees with the mapping files ({n} draft ids); "
            "rebuild them with that size or drop --draft-vocab-size"
        )
    targets = torch.arange(n) + d2t
    if not torch.equal(targets, torch.nonzero(t2d).flatten()):
        raise UserError("--d2t-path and --t2d-path disagree: i + d2t[i] must list the ids marked in t2d, in order")


def load_vocab_mapping(
    d2t_path: str | None,
    t2d_path: str | None,
    data_path: str | None,
    verifier_vocab: int,
    draft_vocab_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit paths win; else `<data-path>/{d2t,t2d}.npy`; else the identity mapping."""
    if (d2t_path is None) != (t2d_path is None):
        raise UserError("--d2t-path and --t2d-path must be given together")
    if d2t_path is None and data_path:
        cand = Path(data_path)
        if (cand / "d2t.npy").is_file() and (cand / "t2d.npy").is_file():
            d2t_path, t2d_path = str(cand / "d2t.npy"), str(cand / "t2d.npy")
    if d2t_path is None:
        if draft_vocab_size is not None and draft_vocab_size != verifier_vocab:
            freq_path = Path(data_path) / "token_freq.pt" if data_path else None
            if freq_path is not None and freq_path.is_file():
                return mapping_from_token_freq(freq_path, verifier_vocab, draft_vocab_size)
            raise UserError(
                f"--draft-vocab-size {draft_vocab_size} needs a vocab mapping: pass --d2t-path/--t2d-path "
                "(from `speculators build-vocab-mapping`) or put d2t.npy/t2d.npy (or the token_freq.pt they are "
                "built from) in --data-path"
            )
        return identity_mapping(verifier_vocab)
    d2t = torch.from_numpy(_load_npy(Path(d2t_path), "--d2t-path").astype(np.int64))
    t2d = torch.from_numpy(_load_npy(Path(t2d_path), "--t2d-path").astype(bool))
    check_mapping(d2t, t2d, verifier_vocab, draft_vocab_size)
    return d2t, t2d


def mapping_from_token_freq(freq_path: Path, verifier_vocab: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mapping `speculators build-vocab-mapping` would build from `freq_path` (as the public
    training script does when --data-path holds token_freq.pt but no d2t.npy/t2d.npy)."""
    import logging

    from speculators.data.vocab import build_mapping, load_token_freq, select_draft_tokens

    if draft_vocab_size > verifier_vocab:
        raise UserError(f"--draft-vocab-size {draft_vocab_size} exceeds the verifier vocabulary {verifier_vocab}")
    chosen = select_draft_tokens(load_token_freq(freq_path), draft_vocab_size, verifier_vocab)
    d2t, t2d = build_mapping(chosen, verifier_vocab)
    logging.getLogger("speculators.train").info(
        "vocab mapping: the %d most frequent tokens of %s (no d2t.npy/t2d.npy given)", draft_vocab_size, freq_path)
    d2t_t, t2d_t = torch.from_numpy(d2t.astype(np.int64)), torch.from_numpy(t2d.astype(bool))
    check_mapping(d2t_t, t2d_t, verifier_vocab, draft_vocab_size)
    return d2t_t, t2d_t
