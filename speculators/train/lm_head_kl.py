"""Draft lm_head -> KL(verifier || draft), three interchangeable implementations.

Each returns, for N rows over a draft vocabulary of V (the objective passes all TTT steps'
rows in one call, so the lm_head runs once and its weight gradient is made once), the
weighted loss `sum_rows weight_row * KL_row` (the only differentiable output), the per-row
KL (detached, for the metrics) and the draft argmax. They differ in what autograd keeps
until backward:

* ``eager``: `log_softmax` then `kl_div` through autograd. Keeps two float32 `[N, V]`
  tensors (the draft log-probs and the gathered target). The reference.
* ``fused`` (default): the logits come from the lm_head as usual; one autograd function
  then computes, chunk by chunk, the KL and already its gradient
  `weight_row * (softmax(z) * sum(p) - p)`, which is all backward needs (it only scales it by
  the incoming scalar). Keeps that gradient in the logits' dtype: half of eager's memory
  in float32, a quarter under bf16 autocast, and fewer passes over `[N, V]` than eager.
  Under `no_grad` (validation) no gradient is made at all.
* ``chunked``: folds the lm_head matmul into the function too and recomputes each chunk's
  logits in backward. Keeps no `[N, V]` tensor, for one extra `[N, H] x [H, V]` matmul;
  for rows so long that even the logits do not fit.

The loss is KL by default; `loss` picks another of `speculators.train.divergences.LOSSES`
(reverse KL, JSD, total variation, LK), each with its closed-form gradient, on all three
paths: the fused/chunked functions only need a per-row value and `dL/dlogits`.

Targets are `target_logp[rows]`, gathered chunk by chunk, so no `[N, V]` copy is made.
They must be finite (log_softmax of finite logits is): a zero probability given as -inf
makes its row nan, as it does with `F.kl_div`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from speculators.train.divergences import LK_ETA_DEFAULT, check_loss, divergence_eager, row_loss_and_grad

LOSS_IMPLS = ("fused", "chunked", "eager")


def auto_chunk_rows(vocab: int, device_type: str) -> int:
    """Rows per chunk: about 1M elements (4 MB float32 temporaries) on the CPU, where larger
    buffers are mapped fresh from the OS on every allocation and page faults dominate
    (measured: 128 rows at V = 8192 run 2.3x faster than 1024); 32M elements on GPUs,
    where each chunk costs kernel launches instead."""
    elements = 2**20 if device_type == "cpu" else 2**25
    return max(1, elements // max(1, vocab))


def check_loss_options(impl: str, chunk_rows: int) -> None:
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss implementation {impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
    if chunk_rows < 0:
        raise ValueError(f"loss chunk rows must be >= 0 (0: automatic), got {chunk_rows}")


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _chunk_kl(logits: torch.Tensor, target_rows: torch.Tensor, grad_scale: torch.Tensor | None,
              loss: str = "kl", eta: float = LK_ETA_DEFAULT):
    """One chunk: per-row loss (float32; float64 for float64 logits), argmax, and if
    `grad_scale` `[rows]` is given the gradient `grad_scale * dloss/dlogits` (for KL:
    `grad_scale * (softmax(z) * sum(p) - p)`).

    `target_rows` is a gathered copy of target log-probs and is overwritten.
    """
    with _no_autocast(logits.device.type):
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logq = F.log_softmax(logits, dim=-1, dtype=compute)
        # For bf16 logits, argmax of the float32 log-probs is the logits' argmax (bar near-ties
        # finer than float32 resolution) and several times faster than a bf16 argmax on CPUs.
        pred = (logits if logits.dtype == compute else logq).argmax(-1)
        t = target_rows.to(compute)
        if loss != "kl":
            value, grad = row_loss_and_grad(logq, t, loss, grad_scale is not None, eta)
            return value, pred, None if grad is None else grad.mul_(grad_scale[:, None])
        p = t.exp()
        psum = p.sum(-1)
        kl = t.sub_(logq).mul_(p).sum(-1)  # in place: no further [rows, V] buffer
        if grad_scale is None:
            return kl, pred, None
        scale = grad_scale[:, None]
        grad = logq.exp_().mul_(psum[:, None] * scale).sub_(p.mul_(scale))
        return kl, pred, grad


class _FusedKL(torch.autograd.Function):
    """Weighted KL sum from given logits; the gradient is made in forward and kept."""

    @staticmethod
    def forward(ctx, logits, target_logp, rows, weight, chunk, loss="kl", eta=LK_ETA_DEFAULT):
        n = logits.shape[0]
        kl = torch.empty(n, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                         device=logits.device)
        pred = torch.empty(n, dtype=torch.long, device=logits.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        scale = weight if want_grad else None  # float32 [N] (lm_head_kl made it so)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            kl[a:b], pred[a:b], g = _chunk_kl(logits[a:b], target_logp[rows[a:b]],
                                              None if scale is None else scale[a:b], loss, eta)
            if g is not None:
                grad[a:b] = g
        if want_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kl, pred)
        return (weight * kl).sum(), kl, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_pred):
        (grad,) = ctx.saved_tensors
        if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:  # (no host sync on GPUs)
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _matmul_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


class _ChunkedLmHeadKL(torch.autograd.Function):
    """lm_head + weighted KL sum in row chunks; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight_matrix, target_logp, rows, weight, chunk, loss="kl", eta=LK_ETA_DEFAULT):
        mm = _matmul_dtype(hidden.device.type, hidden.dtype)
        n = hidden.shape[0]
        kl = torch.empty(n, dtype=torch.float64 if mm == torch.float64 else torch.float32, device=hidden.device)
        pred = torch.empty(n, dtype=torch.long, device=hidden.device)
        w = weight_matrix.to(mm)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            kl[a:b], pred[a:b], _ = _chunk_kl(hidden[a:b].to(mm) @ w.t(), target_logp[rows[a:b]], None, loss, eta)
        ctx.save_for_backward(hidden, weight_matrix, target_logp, rows, weight)
        ctx.chunk, ctx.mm = chunk, mm  # backward runs outside autocast: remember its dtype
        ctx.loss, ctx.eta = loss, eta
        ctx.mark_non_differentiable(kl, pred)
        return (weight * kl).sum(), kl, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_pred):
        hidden, weight_matrix, target_logp, rows, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.float64 if ctx.mm == torch.float64 else torch.float32
        grad_w = torch.zeros(weight_matrix.shape, dtype=acc, device=weight_matrix.device) if need_w else None
        scale = (weight * grad_loss).to(acc)
        w = weight_matrix.to(ctx.mm)
        for a in range(0, hidden.shape[0], ctx.chunk):
            b = min(hidden.shape[0], a + ctx.chunk)
            h = hidden[a:b].to(ctx.mm)
            _, _, d = _chunk_kl(h @ w.t(), target_logp[rows[a:b]], scale[a:b], ctx.loss, ctx.eta)
            d = d.to(ctx.mm)
            if need_h:
                grad_h[a:b] = d @ w
            if need_w:
                if ctx.mm == acc:
                    grad_w.addmm_(d.t(), h)  # in place: no [V, H] temporary
                else:
                    grad_w.add_(d.t() @ h)
        grad_w = None if grad_w is None else grad_w.to(weight_matrix.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def kl_fused(logits, target_logp, rows, weight, chunk_rows, loss="kl", eta=LK_ETA_DEFAULT):
    return _FusedKL.apply(logits, target_logp, rows, weight, chunk_rows, loss, eta)


def kl_eager(logits, target_logp, rows, weight, loss="kl", eta=LK_ETA_DEFAULT):
    kl = divergence_eager(logits, target_logp[rows], loss, eta)  # KL: kl_per_token's formula (float64 kept)
    return (weight.to(kl.dtype) * kl).sum(), kl.detach(), logits.detach().argmax(-1)


def lm_head_kl_chunked(hidden, weight_matrix, target_logp, rows, weight, chunk_rows, loss="kl", eta=LK_ETA_DEFAULT):
    return _ChunkedLmHeadKL.apply(hidden, weight_matrix, target_logp, rows, weight, chunk_rows, loss, eta)


def lm_head_kl(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    target_logp: torch.Tensor,
    rows: torch.Tensor,
    weight: float | torch.Tensor = 1.0,
    impl: str = "fused",
    chunk_rows: int = 0,
    loss: str = "kl",
    eta: float = LK_ETA_DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(sum_rows weight * KL, per-row KL [N] detached, draft argmax [N])`; with `loss` another
    divergence (`speculators.train.divergences`) in place of KL, `eta` LK's blend rate.

    hidden `[N, H]`; target_logp `[M, V]` log-probabilities (no grad); rows `[N]` picks each
    draft row's target row; weight is a scalar or `[N]`; KL is
    KL(target || softmax(lm_head(hidden))) in float32. `chunk_rows` 0 picks `auto_chunk_rows`.
    """
    check_loss_options(impl, chunk_rows)
    check_loss(loss)
    if not chunk_rows:
        chunk_rows = auto_chunk_rows(lm_head.weight.shape[0], hidden.device.type)
        if impl == "chunked":  # its chunks are matmuls plus a [V, H] accumulation each: keep them tall
            chunk_rows = max(chunk_rows, 1024)
    wdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weight = torch.as_tensor(weight, dtype=wdtype, device=hidden.device).expand(hidden.shape[0]).contiguous()
    if impl == "chunked":
        return lm_head_kl_chunked(hidden, lm_head.weight, target_logp, rows, weight, chunk_rows, loss, eta)
    logits = lm_head(hidden)
    if impl == "fused":
        return kl_fused(logits, target_logp, rows, weight, chunk_rows, loss, eta)
    return kl_eager(logits, target_logp, rows, weight, loss, eta)
