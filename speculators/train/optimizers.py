"""The optimizer of a run: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

Muon (torch.optim.Muon) orthogonalises 2-D updates, so it takes only the draft's hidden
matrices: `fc`, the attention projections, the MLP. AdamW keeps what Muon is not meant for:
vectors (the RMSNorm weights, biases) and the vocabulary-indexed `lm_head` (the embedding
is frozen, and so is `lm_head` under --freeze-lm-head: a frozen tensor is in neither). The two run as one `OptimizerChain`, a `torch.optim.Optimizer` whose
`param_groups` and `state` are those of the two optimizers, so the LR schedule, gradient
clipping, `zero_grad` and checkpointing (`torch.distributed.checkpoint.state_dict`) see a
single optimizer.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from speculators.errors import UserError

logger = logging.getLogger("speculators.train")

# 2-D weights that index the vocabulary: Muon's orthogonalised step is not meant for them.
VOCAB_MATRICES = ("lm_head", "embed_tokens")


def muon_available() -> bool:
    return hasattr(torch.optim, "Muon")


def split_for_muon(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """`(muon, adamw)`: trainable 2-D matrices with both sides > 1 that do not index the
    vocabulary go to Muon, every other trainable parameter to AdamW."""
    muon, adamw = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and min(p.shape) > 1
        if is_matrix and not any(part in VOCAB_MATRICES for part in name.split(".")):
            muon.append(p)
        else:
            adamw.append(p)
    return muon, adamw


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together, seen as one.

    Its `param_groups` are the inner optimizers' group dicts (in order) and its `state` is one
    dict the inner optimizers share, so schedules and state_dict round-trips act on all.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        groups = [g for o in self.optimizers for g in o.param_groups]
        super().__init__(groups, defaults={})  # keeps the same group dicts (defaults add nothing)
        self._share()

    def _share(self) -> None:
        start = 0
        for o in self.optimizers:
            n = len(o.param_groups)
            o.param_groups = self.param_groups[start:start + n]
            for group in o.param_groups:
                for p in group["params"]:
                    if p in o.state and p not in self.state:
                        self.state[p] = o.state[p]
            o.state = self.state
            start += n

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups / self.state: share them again
        self._share()


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: Any, adamw_kernel: dict[str, bool]) -> torch.optim.Optimizer:
    """`cfg.optimizer`'s optimizer over the trainable parameters `named`."""
    params = [p for _, p in named if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw_kernel)
    if cfg.optimizer != "muon":
        raise UserError(f"--optimizer {cfg.optimizer!r}: choose adamw or muon")
    if not muon_available():
        raise UserError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
    muon_params, adamw_params = split_for_muon(named)
    if not muon_params:
        raise UserError("--optimizer muon: the draft has no hidden weight matrix for Muon; use --optimizer adamw")
    logger.info("optimizer: Muon over %d matrices, AdamW over %d other tensors", len(muon_params), len(adamw_params))
    parts: list[torch.optim.Optimizer] = []
    if adamw_params:  # first, so the logged lr (group 0) is --lr's
        parts.append(torch.optim.AdamW(adamw_params, lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw_kernel))
    parts.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay,
                                  momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_adjust_lr))
    return OptimizerChain(parts)
