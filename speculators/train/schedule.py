"""Learning-rate schedule: transformers' warmup + cosine / linear / constant schedules.

One difference is kept from this project's earlier schedule: warmup step `s` uses
transformers' factor for `s + 1`, so the first optimizer step trains at lr/warmup
instead of lr 0; after warmup the factors are transformers' own.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

_NAMES = {"cosine": "cosine", "linear": "linear", "none": "constant_with_warmup"}


@lru_cache(maxsize=64)
def _transformers_lambda(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    from transformers import get_scheduler

    if kind not in _NAMES:
        raise ValueError(f"unknown scheduler {kind!r}")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(_NAMES[kind], probe, num_warmup_steps=warmup_steps,
                         num_training_steps=max(total_steps, warmup_steps + 1)).lr_lambdas[0]


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    f = _transformers_lambda(kind, total_steps, warmup_steps)
    return float(f(step + 1) if step < warmup_steps else f(step))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    f = _transformers_lambda(kind, total_steps, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: f(s + 1) if s < warmup_steps else f(s))
