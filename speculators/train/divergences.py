"""The training losses between the verifier's and the draft's next-token distributions.

Pure math over one chunk of rows: `p = exp(t)` is the verifier's distribution restricted to
the draft vocabulary (`t` its log-probabilities), `q = softmax(z)` the draft's (`z` its
logits). Each loss gives its per-row value and, for the fused/chunked paths, its gradient
with respect to `z` in closed form (docs/training.md states every formula):

* ``kl``: KL(p || q) = sum p (t - log q) (forward KL, the EAGLE-3 objective)
* ``reverse_kl``: KL(q || p) = sum q (log q - t)
* ``jsd``: 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2
* ``tv``: 1/2 sum |p - q| (= 1 - sum min(p, q), one minus the acceptance probability)
* ``lk``: lam KL(p || q) + (1 - lam) TV(p, q), lam = exp(-eta * sg(alpha)) per row,
  alpha = sum min(p, q); `sg` stops the gradient (lam is a weight, not a path)

The gradients other than KL's go through the softmax Jacobian: for `g = dL/dq`,
`dL/dz = q * (g - sum(q g))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kl", "reverse_kl", "jsd", "tv", "lk")
LK_ETA_DEFAULT = 3.0


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")


def _softmax_backward(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`dL/dz` from `g = dL/dq` for `q = softmax(z)`."""
    return q * (g - (q * g).sum(-1, keepdim=True))


def _xlogy_ratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`a * (log a - log b)`, 0 where a == 0."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def row_loss_and_grad(logq: torch.Tensor, t: torch.Tensor, loss: str, want_grad: bool,
                      eta: float = LK_ETA_DEFAULT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss `[rows]` and (if `want_grad`) `dL_row/dz` `[rows, V]`.

    `logq` = log_softmax(z) and `t` the target log-probabilities, both `[rows, V]`, in the
    compute dtype (float32, or float64 for gradient checks). `t` may be overwritten.
    """
    if loss == "kl":
        p = t.exp()
        value = (p * (t - logq)).sum(-1)
        grad = logq.exp() * p.sum(-1, keepdim=True) - p if want_grad else None
        return value, grad
    q = logq.exp()
    if loss == "reverse_kl":
        f = logq - t
        value = (q * f).sum(-1)
        grad = q * (f - value[:, None]) if want_grad else None
        return value, grad
    p = t.exp()
    if loss == "jsd":
        logm = torch.logaddexp(t, logq) - torch.log(torch.tensor(2.0, dtype=t.dtype, device=t.device))
        value = 0.5 * (_xlogy_ratio(p, t, logm) + _xlogy_ratio(q, logq, logm)).sum(-1)
        grad = _softmax_backward(q, 0.5 * (logq - logm)) if want_grad else None
        return value, grad
    tv = 0.5 * (p - q).abs().sum(-1)
    if loss == "tv":
        grad = _softmax_backward(q, 0.5 * torch.sign(q - p)) if want_grad else None
        return tv, grad
    if loss == "lk":
        lam = torch.exp(-eta * (1.0 - tv))  # alpha = sum min(p, q) = 1 - TV (p and q both sum to 1)
        kl = (p * (t - logq)).sum(-1)
        value = lam * kl + (1.0 - lam) * tv
        if not want_grad:
            return value, None
        g_kl = q * p.sum(-1, keepdim=True) - p
        g_tv = _softmax_backward(q, 0.5 * torch.sign(q - p))
        return value, lam[:, None] * g_kl + (1.0 - lam[:, None]) * g_tv
    raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")


def divergence_eager(logits: torch.Tensor, target_logp: torch.Tensor, loss: str,
                     eta: float = LK_ETA_DEFAULT) -> torch.Tensor:
    """Per-row loss `[N]` through plain autograd (the ``eager`` path), float32 or wider."""
    check_loss(loss)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logq = F.log_softmax(logits, dim=-1, dtype=dtype)
    t = target_logp.to(dtype)
    p = t.exp()
    if loss == "kl":
        return F.kl_div(logq, t, reduction="none", log_target=True).sum(-1)
    q = logq.exp()
    if loss == "reverse_kl":
        return (q * (logq - t)).sum(-1)
    if loss == "jsd":
        m = 0.5 * (p + q)
        logm = torch.log(m)
        return 0.5 * (_xlogy_ratio(p, t, logm) + _xlogy_ratio(q, logq, logm)).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    if loss == "tv":
        return tv
    lam = torch.exp(-eta * torch.minimum(p, q).sum(-1)).detach()
    kl = F.kl_div(logq, t, reduction="none", log_target=True).sum(-1)
    return lam * kl + (1.0 - lam) * tv
