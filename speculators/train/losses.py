"""TTT loss and metrics as pure functions over already-aligned tensors.

Per TTT step `k` the trainer accumulates five sums (`STAT_FIELDS`); they are summed over
ranks, batches and validation before any ratio is taken, so metrics do not depend on how
tokens were split across processes or steps. `V_k` are the draft starts counted at step
`k` (its target `i + k` is loss-masked and in the same document; `V_0` are the loss-masked
positions), `A_k` the starts in `V_0` whose steps `0..k` all exist and all agreed
(`A_-1 = V_0`); docs/training.md defines the metrics with formulas:

* `loss_k`     = sum of KL(verifier || draft) over `V_k` / |V_k|
* `full_acc_k` = |A_k| / |V_0|: steps 0..k all right (cumulative, non-increasing in k)
* `cond_acc_k` = |A_k| / |A_k-1|: step k right given steps 0..k-1 right
* `step_acc_k` = step k right over `V_k`, whatever the earlier steps did
* `loss`       = sum_k decay**k * loss_k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# chain_correct = |A_k|, chain_total = |A_k-1| (|V_0| at k = 0, the full_acc denominator)
STAT_FIELDS = ("loss_sum", "count", "correct", "chain_correct", "chain_total")


def kl_per_token(draft_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) per row, `[N, V]` -> `[N]`, computed in float32."""
    draft_logp = F.log_softmax(draft_logits.float(), dim=-1)
    return F.kl_div(draft_logp, target_logp.float(), log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def step_stats(positions: list[torch.Tensor], agree: torch.Tensor, kl: torch.Tensor, n: int) -> torch.Tensor:
    """Summable stats `[K, 5]` of one batch.

    `positions[k]` are the flat indices (of `n` positions) of the draft starts counted at
    step k; `agree` and `kl` hold one entry per counted start, steps concatenated in order.
    A start whose step k is not counted (its target is past the document's end or not
    loss-masked) cannot have steps 0..k all right.
    """
    dev = agree.device
    stats = torch.zeros(len(positions), len(STAT_FIELDS), device=dev)
    chain = torch.zeros(n, dtype=torch.bool, device=dev)
    if positions:
        chain[positions[0]] = True  # A_-1 = V_0
    start = 0
    for k, idx in enumerate(positions):
        end = start + idx.numel()
        ok = agree[start:end]
        nxt = torch.zeros_like(chain)
        nxt[idx] = chain[idx] & ok
        stats[k, 0] = kl[start:end].float().sum()
        stats[k, 1] = idx.numel()
        stats[k, 2] = ok.sum()
        stats[k, 3] = nxt.sum()
        stats[k, 4] = chain.sum()
        chain = nxt
        start = end
    return stats


def summarize(stats: torch.Tensor, decay: float) -> dict[str, float]:
    """Turn summed stats `[K, 5]` into the metric dict: per step `loss_k`, `full_acc_k`,
    `cond_acc_k`, `step_acc_k` (the seeds' console order), then `loss`."""
    out: dict[str, float] = {}
    total = 0.0
    s = stats.double().cpu()
    starts = float(s[0, 4]) if s.shape[0] else 0.0  # |V_0|
    for k in range(s.shape[0]):
        loss_sum, count, correct, chain_correct, chain_total = s[k].tolist()
        loss_k = loss_sum / count if count else 0.0
        out[f"loss_{k}"] = loss_k
        out[f"full_acc_{k}"] = chain_correct / starts if starts else 0.0
        out[f"cond_acc_{k}"] = chain_correct / chain_total if chain_total else 0.0
        out[f"step_acc_{k}"] = correct / count if count else 0.0
        total += decay**k * loss_k
    out["loss"] = total
    return out
