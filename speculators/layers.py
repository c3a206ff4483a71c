"""Which verifier layers feed the EAGLE-3 draft: one numbering for every stage.

Id ``i < n`` is the residual stream entering decoder layer ``i`` (transformers'
``hidden_states[i]``, vLLM's ``eagle_aux_hidden_state_layer_ids``); id ``n``
(``n = num_hidden_layers``) is the last layer's output before the final norm,
from which the trainer computes the verifier's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

from speculators.errors import UserError


def vllm_default_aux_layer_ids(num_hidden_layers: int) -> list[int]:
    """What vLLM assumes when a speculator config names no aux layers: ``[2, n//2, n-3]``."""
    n = num_hidden_layers
    return [2, n // 2, n - 3]


def default_layer_ids(num_hidden_layers: int) -> list[int]:
    """Low, middle and high aux layers plus the final layer ``n``.

    ``[2, n//2, n-3, n]`` for real models; tiny models (n < 7) get the distinct
    ids of that choice, clamped into range.
    """
    n = num_hidden_layers
    if n < 2:
        raise UserError(f"the verifier has {n} hidden layers; EAGLE-3 needs at least 2")
    aux: list[int] = []
    for i in vllm_default_aux_layer_ids(n):
        i = min(max(i, 0), n - 1)
        if i not in aux:
            aux.append(i)
    return sorted(aux) + [n]


def resolve_layer_ids(
    layer_ids: Sequence[int] | None,
    num_hidden_layers: int,
    include_last_layer: bool = True,
    flag: str = "--layer-ids",
    require_final: bool = True,
) -> list[int]:
    """Check user layer ids against the model; append the final layer ``n`` when asked.

    With ``require_final`` the list must end with ``n`` (the trainer needs it
    for the verifier's logits); without it a list of aux layers alone is kept.
    """
    n = num_hidden_layers
    if not layer_ids:
        return default_layer_ids(n)
    ids = [int(i) for i in layer_ids]
    bad = [i for i in ids if not 0 <= i <= n]
    if bad:
        raise UserError(
            f"{flag} {bad} out of range: the verifier has {n} decoder layers, so ids must be "
            f"in [0, {n}] (id {n} is the final layer, pre-norm)"
        )
    if len(set(ids)) != len(ids):
        raise UserError(f"{flag} {ids} repeats a layer (duplicates are not allowed); give each layer once")
    if n in ids and ids[-1] != n:
        raise UserError(f"{flag} {ids}: the final layer id {n} must come last")
    if include_last_layer and n not in ids:
        ids.append(n)
    if require_final and ids[-1] != n:
        raise UserError(f"{flag} {ids}: the last id must be the final layer {n}")
    if len(ids) < 2:
        raise UserError(f"{flag} {ids}: give at least one aux layer besides the final layer {n}")
    return ids
