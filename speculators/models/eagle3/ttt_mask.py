"""Attention masks and loss alignment for test-time training (TTT), as pure functions.

Packed rows hold several documents; `document_ids [B, T]` names each token's document
(-1 on padding).  During TTT the draft is unrolled `k` times over the same row.  Step `s`
produces keys at every position; a query of step `s` at position `i` may attend to

* the step-0 ("context") keys at positions `j <= i` of the same document, and
* the keys of steps `1..s` at exactly position `i` (its own earlier-step outputs).

Padding queries only see themselves so no softmax row is empty.  The dense form below
is the reference; the trainer never builds it for real batches: the CPU attention uses
the `[B, T, T]` context mask plus per-step diagonal scores, the GPU path a flex
attention `mask_mod` with the same rule.
"""

from __future__ import annotations

import torch


def context_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool `[B, T, T]`: causal, same-document, non-padding query; diagonal always allowed."""
    t = document_ids.shape[-1]
    pos = torch.arange(t, device=document_ids.device)
    causal = pos[:, None] >= pos[None, :]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    real = (document_ids != -1)[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=document_ids.device)
    return (causal & same_doc & real) | eye


def ttt_mask_dense(document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Reference bool mask `[B, T, T * (step + 1)]` for queries of TTT step `step`.

    Key block 0 holds the step-0 keys, block `j` the keys of step `j`.
    """
    b, t = document_ids.shape
    eye = torch.eye(t, dtype=torch.bool, device=document_ids.device).expand(b, t, t)
    blocks = [context_mask(document_ids)] + [eye] * step
    return torch.cat(blocks, dim=-1)


def ttt_mask_mod(document_ids: torch.Tensor, seq_len: int, window: int | None = None,
                 query_pos: torch.Tensor | None = None):
    """The same rule as `ttt_mask_dense` as a flex-attention `mask_mod(b, h, q, kv)`.

    Keys are laid out as the `seq_len` step-0 keys, then one block per later step holding the
    keys at the query positions. `query_pos` `[B, N]` (`ttt_query_rows`, pads clamped to 0):
    query `q` is the token at `query_pos[b, q]` and the later-step blocks are `N` long, so
    flex computes only the kept rows against every context key; None: every position (N = T).
    `window`: context keys only with `pos - kv < window` (the earlier-step keys stay visible).
    """
    n = seq_len if query_pos is None else query_pos.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx if query_pos is None else query_pos[b, q_idx]
        in_context = kv_idx < seq_len
        kv_pos = kv_idx % seq_len  # only read where in_context
        doc_q = document_ids[b, pos]
        ctx = (pos >= kv_pos) & (doc_q == document_ids[b, kv_pos]) & (doc_q != -1)
        if window is not None:
            ctx = ctx & (pos - kv_pos < window)
        own_later = ~in_context & ((kv_idx - seq_len) % n == q_idx)
        return (in_context & (ctx | (kv_pos == pos))) | own_later

    return mask_mod


def step_valid_positions(loss_mask: torch.Tensor, document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Bool `[B, T]` over draft start positions `i` that count for TTT step `step`.

    Step `step` at position `i` predicts the verifier distribution stored at `i + step`;
    that target must exist, be loss-masked and belong to the same document as `i`.
    """
    b, t = loss_mask.shape
    valid = torch.zeros(b, t, dtype=torch.bool, device=loss_mask.device)
    if step >= t:
        return valid
    n = t - step
    tgt_doc = document_ids[:, step:]
    valid[:, :n] = (loss_mask[:, step:] != 0) & (tgt_doc == document_ids[:, :n]) & (tgt_doc != -1)
    return valid


def ttt_query_rows(loss_mask: torch.Tensor, document_ids: torch.Tensor, ttt_steps: int) -> torch.Tensor | None:
    """Positions whose draft output some TTT step counts, `[B, N]` long (-1 pads short rows), or
    None when that is every position of the widest row (nothing to skip).

    A step-`s` query at `i` sees the step-0 keys and only its own position's keys of steps
    `1..s`, so a position counted at no step `0..K-1` influences the loss only through its
    step-0 keys/values: every later step, and the last layer's step-0 query, can skip it.
    """
    b, t = loss_mask.shape
    used = torch.zeros(b, t, dtype=torch.bool, device=loss_mask.device)
    for s in range(ttt_steps):
        used |= step_valid_positions(loss_mask, document_ids, s)
    counts = used.sum(1)
    n = max(1, int(counts.max())) if b else 1
    if n >= t:
        return None
    pos = torch.arange(t, device=used.device).expand(b, t)
    # stable sort puts the used positions first, in order
    order = torch.sort((~used).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    rows = torch.where(torch.arange(n, device=used.device)[None] < counts[:, None], pos.gather(1, order), -1)
    return rows


def compact_index(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Flat map `[B * T]`: position `b * T + i` -> its index `b * N + j` in the `[B, N]` row
    layout of `ttt_query_rows` (-1 where `i` is not kept)."""
    b, n = rows.shape
    inv = torch.full((b * seq_len,), -1, dtype=torch.long, device=rows.device)
    real = rows >= 0
    src = (torch.arange(b, device=rows.device)[:, None] * seq_len + rows)[real]
    inv[src] = (torch.arange(b, device=rows.device)[:, None] * n + torch.arange(n, device=rows.device))[real]
    return inv


def shift_tokens(input_ids: torch.Tensor, step: int, pad_id: int = 0) -> torch.Tensor:
    """Ground-truth tokens fed at TTT step `step`: `input_ids` shifted left by `step`."""
    if step == 0:
        return input_ids
    pad = input_ids.new_full((input_ids.shape[0], min(step, input_ids.shape[1])), pad_id)
    return torch.cat([input_ids[:, step:], pad], dim=1)


__all__ = ["compact_index", "context_mask", "shift_tokens", "step_valid_positions", "ttt_query_rows", "ttt_mask_dense", "ttt_mask_mod"]
