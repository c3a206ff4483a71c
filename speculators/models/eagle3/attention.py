"""Attention kernels for the draft: TTT training attention and cached causal inference.

TTT attention (see `speculators.models.eagle3.ttt_mask` for the rule): a step-`s` query sees the
step-0 keys through a `[B, T, T]` context mask and the keys of steps `1..s` only at its
own position.  On CPU (and as the reference) the extra keys contribute one score each,
computed as a dot product, so no `[T, T * (s + 1)]` mask is ever built.  On CUDA the
same rule runs through flex attention over the concatenated keys.  Both take the compact
form of the sparse unroll (`ttt_mask.ttt_query_rows`): queries, and the keys of steps 1..,
only at the kept positions, the step-0 keys at every position.

Sliding-window layers further restrict the context keys to `q - kv < window` (the query's
own position included); the earlier-step keys at the query's own position stay visible.
The draft model passes a step-`s` query the window `W - s` (see `model.ttt_window`), which is
vLLM's per-layer window at inference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from speculators.models.eagle3.ttt_mask import ttt_mask_mod


def _group(q: torch.Tensor, num_kv: int) -> torch.Tensor:
    """[B, H, T, d] -> [B, Hkv, G, T, d] so GQA needs no repeated K/V."""
    b, h, t, d = q.shape
    return q.view(b, num_kv, h // num_kv, t, d)


def windowed(ctx_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Restrict a `[B, T, T]` context mask to keys with `q - kv < window` (None: unchanged)."""
    if window is None:
        return ctx_mask
    t = ctx_mask.shape[-1]
    pos = torch.arange(t, device=ctx_mask.device)
    return ctx_mask & ((pos[:, None] - pos[None, :]) < window)


def ttt_attention_sdpa(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    ctx_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q `[B, H, T, d]`; keys/values: per TTT step `[B, Hkv, T, d]` (step 0 first).

    ctx_mask: bool `[B, T, T]` for the step-0 keys.  Returns `[B, H, T, d]`.
    """
    if len(keys) == 1:
        return F.scaled_dot_product_attention(
            q, keys[0], values[0], attn_mask=ctx_mask[:, None], scale=scale, enable_gqa=q.shape[1] != keys[0].shape[1]
        )
    num_kv = keys[0].shape[1]
    qg = _group(q, num_kv)  # [B, Hkv, G, T, d]
    ctx = torch.einsum("bkgtd,bksd->bkgts", qg, keys[0]) * scale
    ctx = ctx.masked_fill(~ctx_mask[:, None, None], float("-inf"))
    diag = torch.stack([(qg * k[:, :, None]).sum(-1) for k in keys[1:]], dim=-1) * scale  # [B,Hkv,G,T,s]
    probs = torch.softmax(torch.cat([ctx, diag], dim=-1).float(), dim=-1).to(q.dtype)
    t = ctx.shape[-1]
    out = torch.einsum("bkgts,bksd->bkgtd", probs[..., :t], values[0])
    for j, v in enumerate(values[1:]):
        out = out + probs[..., t + j, None] * v[:, :, None]
    b, h, tq, d = q.shape
    return out.reshape(b, h, tq, d)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def ttt_attention_flex(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    document_ids: torch.Tensor,
    scale: float,
    block_mask_cache: dict | None = None,
    compile: bool = True,
    window: int | None = None,
    query_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flex-attention form of `ttt_attention_sdpa` (same mask rule, keys concatenated).

    `query_pos` `[B, N]` (`ttt_query_rows`, -1 pads): `q` holds only those positions' queries
    and `keys[1:]`/`values[1:]` only their keys, `keys[0]` every position's; the mask maps each
    query row to its position, so flex computes `N` query rows (the compact form of the SDPA path).
    `N` changes from batch to batch; the compiled kernel gets it padded to `T` rows instead, so
    its shapes stay static (one compile per TTT step count, no dynamic-shape kernel, no
    recompile limit): a pad row reads position 0, so it sees key 0 and its own later keys only,
    and flex's block mask skips almost all of its work. Eager flex runs the `N` rows as they are.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, _, tq, _ = q.shape
    t = keys[0].shape[2]
    if query_pos is None and tq != t:
        raise ValueError(f"ttt_attention_flex: {tq} queries for {t} context keys needs query_pos")
    if query_pos is not None and tuple(query_pos.shape) != (b, tq):
        raise ValueError(f"ttt_attention_flex: query_pos {tuple(query_pos.shape)} does not match q's [B, N] {(b, tq)}")
    if query_pos is not None and compile and tq < t:
        pad = t - tq
        padded = ttt_attention_flex(
            F.pad(q, (0, 0, 0, pad)), [keys[0], *(F.pad(k, (0, 0, 0, pad)) for k in keys[1:])],
            [values[0], *(F.pad(v, (0, 0, 0, pad)) for v in values[1:])], document_ids, scale,
            block_mask_cache, compile, window, F.pad(query_pos, (0, pad), value=-1))
        return padded[:, :, :tq]
    steps = len(keys)
    kv_len = t + tq * (steps - 1)
    key = (steps, tq, query_pos is not None)  # a compact call of N == T rows is not the dense one
    block_mask = None if block_mask_cache is None else block_mask_cache.get(key)
    if block_mask is None:
        pos = None if query_pos is None else query_pos.clamp(min=0)  # pads read position 0 (as gather_rows)
        mask_mod = ttt_mask_mod(document_ids, t, window, pos)
        block_mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=tq, KV_LEN=kv_len, device=q.device)
        if block_mask_cache is not None:
            block_mask_cache[key] = block_mask
    k = torch.cat(keys, dim=2)
    v = torch.cat(values, dim=2)
    fn = _compiled_flex() if compile else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def cached_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal attention where the last `q.shape[2]` keys are the new tokens (inference).

    `window`: keep only keys with `q - kv < window` (sliding-window layers).
    """
    tq, tk = q.shape[2], k.shape[2]
    qpos = torch.arange(tk - tq, tk, device=q.device)
    kpos = torch.arange(tk, device=q.device)
    mask = qpos[:, None] >= kpos[None, :]
    if window is not None:
        mask = mask & ((qpos[:, None] - kpos[None, :]) < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
