"""Proposal: TTT attention on the CPU path as ONE fused SDPA call per step, mask cached per batch.

Today `speculators.models.eagle3.attention.ttt_attention_sdpa` uses fused SDPA only for
step 0; for steps s >= 1 it computes the context scores with an einsum, fills the masked
ones with -inf, stacks one extra score per earlier step, takes an fp32 softmax over
`[B, Hkv, G, T, T + s]` and combines values with another einsum, all eagerly, and autograd
keeps every intermediate. That is the largest share of a CPU step (bench/breakdown.py).

`ttt_attention_concat` concatenates the keys/values of steps 0..s along the key axis and
calls `F.scaled_dot_product_attention` once with a boolean mask `[B, 1, T, T * (s + 1)]`:
the context mask for the step-0 block and an identity (own position) for each later block,
which is exactly `speculators.train.ttt_mask.ttt_mask_dense`. The fused kernel never
materialises the probabilities for backward. The mask is built once per batch and step
count (`mask_cache`), so it costs one `[T, T * (s + 1)]` bool tensor per step count
(T = 2048: 12 MiB for s = 2), and the same cache serves every layer.

Drop-in (the trainer owns the model files; the lead applies it): in
`speculators/models/eagle3/attention.py` add this function, and in
`Eagle3DraftModel.iter_ttt` replace `ttt_attention_sdpa(q, keys, values, ctx, scale)` by
`ttt_attention_concat(q, keys, values, ctx, scale, mask_cache)` with `mask_cache = {}`
created next to `block_masks` (once per forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ttt_mask_from_context(ctx_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """`[B, T, T]` context mask -> `[B, 1, T, T * steps]` (step-0 block + identity blocks)."""
    b, t, _ = ctx_mask.shape
    eye = torch.eye(t, dtype=torch.bool, device=ctx_mask.device).expand(b, t, t)
    return torch.cat([ctx_mask] + [eye] * (steps - 1), dim=-1)[:, None]


def ttt_attention_concat(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    ctx_mask: torch.Tensor,
    scale: float,
    mask_cache: dict | None = None,
) -> torch.Tensor:
    """Same contract as `ttt_attention_sdpa`: q `[B, H, T, d]`, per-step keys/values
    `[B, Hkv, T, d]` (step 0 first), ctx_mask bool `[B, T, T]`; returns `[B, H, T, d]`."""
    steps = len(keys)
    gqa = q.shape[1] != keys[0].shape[1]
    if steps == 1:
        return F.scaled_dot_product_attention(q, keys[0], values[0], attn_mask=ctx_mask[:, None], scale=scale, enable_gqa=gqa)
    mask = None if mask_cache is None else mask_cache.get(steps)
    if mask is None:
        mask = ttt_mask_from_context(ctx_mask, steps)
        if mask_cache is not None:
            mask_cache[steps] = mask
    k = torch.cat(keys, dim=2)
    v = torch.cat(values, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def install_into_model_module() -> None:
    """Benchmark-only: route `Eagle3DraftModel.iter_ttt`'s CPU attention through
    `ttt_attention_concat` (with a mask cache keyed by the batch's context mask) without
    editing the model source. Used by `bench/ours_runner.py --attn-proposal`."""
    import speculators.models.eagle3.model as model_mod

    state: dict = {"ctx": None, "cache": {}}

    def attention(q, keys, values, ctx_mask, scale):
        if state["ctx"] is not ctx_mask:  # a new forward (new batch): drop the old masks
            state["ctx"], state["cache"] = ctx_mask, {}
        return ttt_attention_concat(q, keys, values, ctx_mask, scale, state["cache"])

    model_mod.ttt_attention_sdpa = attention
