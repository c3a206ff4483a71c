"""Proposal: draft lm_head + KL to the verifier, in row chunks, never holding `[N, V]` tensors.

Today (speculators/train/objective.py, per TTT step k) the objective does

    logits = self.draft.lm_head(normed.flatten(0, 1)[idx])      # [N_k, V] kept for backward
    kl = kl_per_token(logits, tgt_logp[rows])                     # log_softmax [N_k, V] fp32 kept,
                                                                  # kl_div elementwise [N_k, V] fp32
    loss = loss + decay**k * kl.sum() / denominators[k]

so each step keeps two or three `[N_k, V]` fp32 tensors alive until backward (and autograd
keeps all three steps' tensors at once). At Llama-3.1-8B shape (V = 32000 draft vocab) and
seq 8192 that is 8192 * 32000 * 4 B = 1.05 GB per tensor, about 6-9 GB per step.

`ChunkedLmHeadKL` computes the same KL(target || draft) per row and the draft argmax
(for the accuracy metrics) in chunks of `chunk` rows. Forward keeps only the inputs;
backward recomputes each chunk's logits (one extra `[chunk, H] x [H, V]` matmul per chunk,
i.e. lm_head forward FLOPs twice instead of once) and applies the closed-form gradient
`dKL/dlogits = softmax(logits) - p_target`, scaled per row by the incoming gradient.
Peak extra memory is O(chunk * V) instead of O(N * V).

Drop-in use in `TTTObjective.forward` (the lead applies it; the trainer owns that file):

    from speculators.train.chunked_kl import chunked_lm_head_kl   # this file, moved
    h = normed.flatten(0, 1)[idx]
    kl, pred = chunked_lm_head_kl(h, self.draft.lm_head.weight, tgt_logp, rows)
    loss = loss + (decay**k) * kl.sum() / denominators[k].clamp(min=1e-9)
    agree = pred == tgt_arg[rows]          # replaces logits.argmax(-1)

`tgt_logp` stays as the objective computes it (once per batch, all target rows); `rows`
selects the target row of each draft row, so no `[N_k, V]` gathered copy is made either.
Under CUDA autocast the chunk matmul runs in bf16 like `nn.Linear` would and the softmax /
KL in fp32, matching `kl_per_token`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        return (h.to(dtype) @ weight.to(dtype).t()).float()
    return (h @ weight.t()).float()


class ChunkedLmHeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target_logp, rows, chunk):
        n = hidden.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        pred = torch.empty(n, dtype=torch.long, device=hidden.device)
        with torch.no_grad():
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                logits = _chunk_logits(hidden[a:b], weight)
                logp = F.log_softmax(logits, dim=-1)
                t_logp = target_logp[rows[a:b]].float()
                kl[a:b] = (t_logp.exp() * (t_logp - logp)).sum(-1)
                pred[a:b] = logits.argmax(-1)
        ctx.save_for_backward(hidden, weight, target_logp, rows)
        ctx.chunk = chunk
        ctx.autocast = torch.is_autocast_enabled(hidden.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(hidden.device.type) if ctx.autocast else None
        ctx.mark_non_differentiable(pred)
        return kl, pred

    @staticmethod
    def backward(ctx, grad_kl, _grad_pred):
        hidden, weight, target_logp, rows = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        mm_dtype = ctx.autocast_dtype if ctx.autocast else hidden.dtype
        w_mm = weight.to(mm_dtype)
        for a in range(0, hidden.shape[0], chunk):
            b = min(hidden.shape[0], a + chunk)
            h = hidden[a:b].to(mm_dtype)
            logits = (h @ w_mm.t()).float()
            d = torch.softmax(logits, dim=-1)
            d.sub_(target_logp[rows[a:b]].float().exp())
            d.mul_(grad_kl[a:b, None])
            d = d.to(mm_dtype)
            if need_h:
                grad_h[a:b] = (d @ w_mm).to(hidden.dtype)
            if need_w:
                if mm_dtype == torch.float32:
                    grad_w.addmm_(d.t(), h)  # accumulate in place: no [V, H] temporary
                else:
                    grad_w.add_(d.t() @ h)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_lm_head_kl(hidden: torch.Tensor, weight: torch.Tensor, target_logp: torch.Tensor, rows: torch.Tensor,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(target || softmax(hidden @ weight.T)) `[N]` (differentiable) and argmax `[N]`.

    hidden `[N, H]`, weight `[V, H]`, target_logp `[M, V]` log-probabilities, rows `[N]`
    indices into target_logp.
    """
    return ChunkedLmHeadKL.apply(hidden, weight, target_logp, rows, int(chunk))


def reference_lm_head_kl(hidden, weight, target_logp, rows):
    """What the objective does today (for the before/after and the equivalence check)."""
    logits = hidden @ weight.t()
    draft_logp = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(draft_logp, target_logp[rows].float(), log_target=True, reduction="none").sum(-1)
    return kl, logits.argmax(-1)
