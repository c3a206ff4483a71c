"""The verifier's final norm + lm_head as a frozen module: the training targets.

The targets are the verifier's next-token distribution: final norm + lm_head applied to
the saved last-layer hidden state.  The tensors come from
`speculators.verifier.load_verifier_weights` (read from the safetensors shards only).
"""

from __future__ import annotations

import torch
from torch import nn


class VerifierHead(nn.Module):
    """Frozen final norm + lm_head restricted to the draft vocabulary (rows picked by t2d).

    Held as buffers so FSDP leaves them whole and the optimizer never sees them.
    """

    def __init__(self, norm_weight: torch.Tensor, lm_head_rows: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("norm_weight", norm_weight.detach().clone())
        self.register_buffer("weight", lm_head_rows.detach().clone())
        self.eps = eps

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], t2d: torch.Tensor, eps: float) -> VerifierHead:
        return cls(weights["norm"], weights["lm_head"][t2d.bool()], eps)

    def forward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` verifier final-layer states -> `[N, draft_vocab]` float32 logits."""
        x = last_hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm_weight * x) @ self.weight.t()


def verifier_targets(head: "VerifierHead", last_hidden: torch.Tensor, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verifier's targets at the flat `positions` of `last_hidden [B, T, H]` (no gradient):
    `(log_probs [P, V_draft] float32, argmax [P], rowmap [B*T])`, where `rowmap` gives each flat
    position its row in the targets (-1 where none was computed). Every objective reads them so."""
    import torch.nn.functional as F

    with torch.no_grad():
        logp = F.log_softmax(head(last_hidden.flatten(0, 1)[positions]).float(), dim=-1)
        arg = logp.argmax(-1)
    rowmap = torch.full((last_hidden.shape[0] * last_hidden.shape[1],), -1, dtype=torch.long,
                        device=positions.device)
    rowmap[positions] = torch.arange(positions.numel(), device=positions.device)
    return logp, arg, rowmap
