"""The DFlash training objective: blocks anchored on the data's positions, KL to the verifier.

In the shifted batch (`speculators.data.dataset`) index ``i`` holds the verifier's aux states
at position ``i`` (``hidden_states``), token ``i+1`` (``input_ids``, at ``position_ids = i+1``)
and the verifier's prediction of token ``i+2`` (``verifier_last_hidden_states``). A block
anchored at index ``i`` is what vLLM drafts after the verified prefix ``0..i``: the context is
the aux states at positions ``<= i`` of the same document, the anchor is token ``i+1`` (the
verifier's bonus token) and slot ``k`` predicts token ``i+1+k``, whose verifier distribution
is row ``i+k-1``. So slot ``k`` counts exactly where EAGLE-3's TTT step ``k-1`` counts
(`step_valid_positions`), and the trainer's per-step metrics mean the same for both
algorithms (step ``k-1`` = the ``k``-th drafted token).

Anchors: every start that counts for slot 1, or a random ``num_anchors`` of them per row
(the anchors' trainers sample 512); the loss is the mean KL per slot over the anchors used.
"""

from __future__ import annotations

import torch
from torch import nn

from speculators.models.dflash.model import DFlashDraftModel
from speculators.models.eagle3.ttt_mask import step_valid_positions
from speculators.train.lm_head_kl import check_loss_options, lm_head_kl
from speculators.train.losses import step_stats
from speculators.train.verifier import VerifierHead, verifier_targets


def pick_anchors(valid: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`valid [B, T]` -> `(anchors [B, N] long, keep [B, N] bool)`, N = min(num_anchors, max valid per row);
    all valid starts when they fit (0 = all), else a uniform sample, in ascending order."""
    b, t = valid.shape
    counts = valid.sum(1)
    n = int(counts.max()) if counts.numel() else 0
    if num_anchors:
        n = min(n, num_anchors)
    n = max(n, 1)
    score = torch.rand(b, t, generator=generator, device="cpu").to(valid.device) if num_anchors else \
        torch.arange(t, device=valid.device, dtype=torch.float32).expand(b, t) / t
    score = torch.where(valid, score, torch.full_like(score, 2.0))
    idx = score.argsort(dim=1)[:, :n]
    keep = torch.gather(valid, 1, idx)
    anchors = torch.where(keep, idx, torch.zeros_like(idx))
    order = torch.where(keep, anchors, torch.full_like(anchors, t)).argsort(dim=1)
    return torch.gather(anchors, 1, order), torch.gather(keep, 1, order)


class DFlashObjective(nn.Module):
    def __init__(self, draft: DFlashDraftModel, verifier_head: VerifierHead, loss_impl: str = "fused",
                 loss_chunk_rows: int = 0, num_anchors: int = 512):
        super().__init__()
        check_loss_options(loss_impl, loss_chunk_rows)
        self.draft = draft
        self.verifier_head = verifier_head
        self.loss_impl = loss_impl
        self.loss_chunk_rows = loss_chunk_rows
        self.num_anchors = num_anchors

    def forward(self, batch: dict[str, torch.Tensor], ttt_steps: int, decay: float,
                denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(loss, stats [K, 5])` with K = block_size - 1 (= `ttt_steps`).

        With every anchor used (`num_anchors` 0 or not binding) the loss equals
        `sum_k decay**(k-1) * mean KL of slot k` with the trainer's exact global `denominators`;
        with sampled anchors each slot's mean is over the sampled anchors of this batch.
        """
        cfg = self.draft.config
        k_slots = cfg.block_size - 1
        loss_mask, docs = batch["loss_mask"], batch["document_ids"]
        b, t = loss_mask.shape
        dev = loss_mask.device
        valid = [step_valid_positions(loss_mask, docs, k) for k in range(k_slots)]
        anchors, keep = pick_anchors(valid[0], self.num_anchors)
        sampled = bool(self.num_anchors) and int(valid[0].sum(1).max()) > self.num_anchors
        n = anchors.shape[1]

        ids = torch.gather(batch["input_ids"], 1, anchors)
        pos = torch.gather(batch["position_ids"], 1, anchors)
        anchor_docs = torch.gather(docs, 1, anchors)
        j = torch.arange(t, device=dev)
        ctx_visible = (j[None, None, :] <= anchors[:, :, None]) & (docs[:, None, :] == anchor_docs[:, :, None]) \
            & keep[:, :, None]
        # Context positions are the aux states' own positions (one before the shifted tokens').
        ctx_pos = (batch["position_ids"] - 1).clamp(min=0)
        normed = self.draft.blocks(batch["hidden_states"], ctx_pos, ids, pos, ctx_visible)  # [B, N, bs, H]

        tgt_pos = ((loss_mask != 0) & (docs != -1)).flatten().nonzero().squeeze(1)
        tgt_logp, tgt_arg, rowmap = verifier_targets(self.verifier_head, batch["verifier_last_hidden_states"], tgt_pos)

        flat_anchor = (anchors + torch.arange(b, device=dev)[:, None] * t)  # [B, N] flat start index
        hidden, positions, rows, weights = [], [], [], []
        for k in range(k_slots):  # slot k+1 <-> TTT step k
            ok = keep & torch.gather(valid[k], 1, anchors)
            sel = ok.flatten().nonzero().squeeze(1)
            start = flat_anchor.flatten()[sel]
            hidden.append(normed[:, :, k + 1].flatten(0, 1)[sel])
            positions.append(start)
            rows.append(rowmap[start + k])
            denom = sel.numel() if sampled else denominators[k]
            weights.append((torch.as_tensor(decay**k / max(float(denom), 1e-9), device=dev)).float()
                           .expand(sel.numel()))
        all_rows = torch.cat(rows)
        loss, kl, pred = lm_head_kl(torch.cat(hidden), self.draft.lm_head, tgt_logp, all_rows,
                                    torch.cat(weights), self.loss_impl, self.loss_chunk_rows)
        stats = step_stats(positions, pred == tgt_arg[all_rows], kl, b * t)
        return loss, stats
