"""TTT loss and metrics as pure functions over already-aligned tensors.

Per TTT step `k` the trainer accumulates five sums (`STAT_FIELDS`); they are summed over
ranks and batches before any ratio is taken, so metrics do not depend on how tokens were
split across processes.

* `loss_k`     = sum of KL(verifier || draft) over counted positions / their number
* `full_acc_k` = fraction of counted positions where draft argmax == verifier argmax
* `cond_acc_k` = same, among positions whose steps `0..k-1` (same draft start) all agreed
* `loss`       = sum_k decay**k * loss_k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STAT_FIELDS = ("loss_sum", "count", "correct", "cond_correct", "cond_total")


def kl_per_token(draft_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) per row, `[N, V]` -> `[N]`, computed in float32."""
    draft_logp = F.log_softmax(draft_logits.float(), dim=-1)
    return F.kl_div(draft_logp, target_logp.float(), log_target=True, reduction="none").sum(-1)


def summarize(stats: torch.Tensor, decay: float) -> dict[str, float]:
    """Turn summed stats `[K, 5]` into the metric dict (`loss`, `loss_k`, `full_acc_k`, `cond_acc_k`)."""
    out: dict[str, float] = {}
    total = 0.0
    s = stats.double().cpu()
    for k in range(s.shape[0]):
        loss_sum, count, correct, cond_correct, cond_total = s[k].tolist()
        loss_k = loss_sum / count if count else 0.0
        out[f"loss_{k}"] = loss_k
        out[f"full_acc_{k}"] = correct / count if count else 0.0
        out[f"cond_acc_{k}"] = cond_correct / cond_total if cond_total else 0.0
        total += decay**k * loss_k
    return {"loss": total, **out}
