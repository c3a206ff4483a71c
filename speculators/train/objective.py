"""The TTT training objective: the draft unrolled over a packed batch, KL to the verifier.

Wrapping draft + frozen verifier head in one module keeps every use of the draft's
parameters inside one `forward`, which is what FSDP2 needs to gather/free them.
"""

from __future__ import annotations

import torch
from torch import nn

from speculators.models.eagle3.model import Eagle3DraftModel
from speculators.train.divergences import LK_ETA_DEFAULT, check_loss
from speculators.train.lm_head_kl import check_loss_options, lm_head_kl
from speculators.train.losses import step_stats
from speculators.models.eagle3.ttt_mask import compact_index, step_valid_positions, ttt_query_rows
from speculators.train.verifier import VerifierHead, verifier_targets


def step_token_counts(loss_mask: torch.Tensor, document_ids: torch.Tensor, ttt_steps: int) -> torch.Tensor:
    """Counted positions per TTT step for one batch, `[K]` float (for the loss denominator)."""
    return torch.stack(
        [step_valid_positions(loss_mask, document_ids, k).sum() for k in range(ttt_steps)]
    ).float()


def counted_positions(loss_mask: torch.Tensor, document_ids: torch.Tensor, ttt_steps: int) -> dict[str, torch.Tensor]:
    """The flat indices the objective gathers, as extra batch keys: `target_positions` (where a
    verifier target is needed) and `step_positions_<k>` (the starts counted at TTT step k).

    `nonzero` makes the host wait for the device; the trainer computes these on the host batch
    before copying it, so the step runs without waiting (the objective computes any missing).

    `ttt_rows` (when some position is counted at no step): the positions the TTT unroll keeps
    (`ttt_mask.ttt_query_rows`).
    """
    out = {"target_positions": ((loss_mask != 0) & (document_ids != -1)).flatten().nonzero().squeeze(1)}
    for k in range(ttt_steps):
        out[f"step_positions_{k}"] = step_valid_positions(loss_mask, document_ids, k).flatten().nonzero().squeeze(1)
    rows = ttt_query_rows(loss_mask, document_ids, ttt_steps)
    if rows is not None:
        out["ttt_rows"] = rows
    return out


class TTTObjective(nn.Module):
    def __init__(self, draft: Eagle3DraftModel, verifier_head: VerifierHead, loss_impl: str = "fused",
                 loss_chunk_rows: int = 0, loss: str = "kl", lk_eta: float = LK_ETA_DEFAULT,
                 skip_uncounted: bool = True):
        super().__init__()
        check_loss_options(loss_impl, loss_chunk_rows)
        check_loss(loss)
        self.loss, self.lk_eta = loss, lk_eta
        self.draft = draft
        self.verifier_head = verifier_head
        self.loss_impl = loss_impl
        self.loss_chunk_rows = loss_chunk_rows
        # Run the TTT unroll only where some step's loss reads it (exact; False: every position).
        self.skip_uncounted = skip_uncounted

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        ttt_steps: int,
        decay: float,
        denominators: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(loss, stats [K, 5])`.

        `denominators[k]` divides step k's KL sum; pass the global count of step-k positions
        divided by the world size so that gradient averaging across ranks yields the exact
        global token mean (identical to one process seeing all the batches).
        """
        loss_mask, docs = batch["loss_mask"], batch["document_ids"]
        b, t = loss_mask.shape
        # Verifier targets only where some step can count them.
        tgt_pos = batch.get("target_positions")
        if tgt_pos is None:
            tgt_pos = ((loss_mask != 0) & (docs != -1)).flatten().nonzero().squeeze(1)
        tgt_logp, tgt_arg, rowmap = verifier_targets(self.verifier_head, batch["verifier_last_hidden_states"], tgt_pos)

        rows = None
        if self.skip_uncounted:
            rows = batch["ttt_rows"] if "ttt_rows" in batch else (
                None if "step_positions_0" in batch else ttt_query_rows(loss_mask, docs, ttt_steps))
        to_rows = None if rows is None else compact_index(rows, t)
        steps = self.draft.iter_ttt(
            batch["hidden_states"], batch["input_ids"], docs, batch["position_ids"], ttt_steps, rows
        )
        # Collect every step's counted rows, then apply lm_head + KL once over all of them:
        # one taller matmul and one lm_head weight gradient instead of one per step.
        hidden, positions, rows, weights = [], [], [], []
        for k, normed in steps:
            idx = batch.get(f"step_positions_{k}")
            if idx is None:
                idx = step_valid_positions(loss_mask, docs, k).flatten().nonzero().squeeze(1)
            hidden.append(normed.flatten(0, 1)[idx if to_rows is None else to_rows[idx]])
            positions.append(idx)
            rows.append(rowmap[idx + k])
            weights.append(((decay**k) / denominators[k].clamp(min=1e-9)).float().expand(idx.numel()))
        all_rows = torch.cat(rows)
        loss, kl, pred = lm_head_kl(torch.cat(hidden), self.draft.lm_head, tgt_logp, all_rows,
                                    torch.cat(weights), self.loss_impl, self.loss_chunk_rows, self.loss, self.lk_eta)

        stats = step_stats(positions, pred == tgt_arg[all_rows], kl, b * t)
        return loss, stats
