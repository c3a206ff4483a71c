"""Which verifier layers feed the EAGLE-3 draft: one numbering for every stage.

Id ``i < n`` is the residual stream entering decoder layer ``i`` (transformers'
``hidden_states[i]``, vLLM's ``eagle_aux_hidden_state_layer_ids``); id ``n``
(``n = num_hidden_layers``) is the last layer's output before the final norm,
from which the trainer computes the verifier's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def check_layer_ids(
    ids: Sequence[int],
    num_hidden_layers: int,
    flag: str = "--layer-ids",
    require_final: bool = True,
) -> list[int]:
    """The rules every stage applies: ids in ``[0, n]``, distinct, ascending, at least one
    aux layer, and (``require_final``) the final layer ``n`` last.

    Ascending, not merely distinct: vLLM concatenates the aux hidden states in ascending
    layer order whatever order it is given, so any other order would permute the draft's
    ``fc`` input between our data and vLLM. Unsorted ids are refused rather than sorted
    silently, so data or checkpoints made with another order cannot be reinterpreted.
    """
    n = int(num_hidden_layers)
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i <= n]
    if bad:
        raise UserError(
            f"{flag} {bad} out of range: the verifier has {n} decoder layers, so ids must be "
            f"in [0, {n}] (id {n} is the final layer, pre-norm)"
        )
    if len(set(ids)) != len(ids):
        raise UserError(f"{flag} {ids} repeats a layer (duplicates are not allowed); give each layer once")
    if ids != sorted(ids):
        raise UserError(
            f"{flag} {ids} is not in ascending order: vLLM concatenates aux hidden states in ascending "
            f"layer order, so give them as {sorted(ids)}"
        )
    if require_final and (not ids or ids[-1] != n):
        raise UserError(f"{flag} {ids}: the last id must be the final layer {n}")
    aux = [i for i in ids if i != n]
    if not aux:
        raise UserError(f"{flag} {ids}: give at least one aux layer besides the final layer {n}")
    return ids


def resolve_layer_ids(
    layer_ids: Sequence[int] | None,
    num_hidden_layers: int,
    include_last_layer: bool = True,
    flag: str = "--layer-ids",
    require_final: bool = True,
) -> list[int]:
    """The defaults, or the user's ids (+ the final layer ``n`` when ``include_last_layer``)
    checked by `check_layer_ids`. The one resolver for datagen, launch-vllm, online and train.

    ``require_final`` (datagen, train: the trainer needs layer ``n`` for the verifier's logits)
    refuses a list without ``n`` even when ``include_last_layer`` is off; launch-vllm passes
    ``require_final=include_last_layer`` so its ``--no-include-last-layer`` exports aux layers only."""
    n = int(num_hidden_layers)
    if not layer_ids:
        return default_layer_ids(n)
    ids = [int(i) for i in layer_ids]
    if include_last_layer and n not in ids:
        ids.append(n)
    return check_layer_ids(ids, n, flag, require_final=require_final)


def require_same_layer_ids(expected: Sequence[int], actual: Sequence[int], where: str, what: str) -> None:
    """Compare layer ids by value (not only their count) where data meets a consumer."""
    if [int(i) for i in expected] != [int(i) for i in actual]:
        raise UserError(
            f"{where}: {what} holds layers {list(actual)} but {list(expected)} are expected; "
            "use the same layer ids in launch-vllm/datagen and train (or regenerate the data)"
        )


def text_config_of(model: str, trust_remote_code: bool = False) -> Any:
    """A model's config; for multimodal models, the text model's config (the one reader)."""
    from speculators.verifier import read_verifier_config

    return read_verifier_config(model, flag="MODEL", trust_remote_code=trust_remote_code)


def num_hidden_layers_of(model: str, trust_remote_code: bool = False, text_config: Any = None) -> int:
    """Read ``num_hidden_layers`` from a model's (text) config."""
    text = text_config if text_config is not None else text_config_of(model, trust_remote_code)
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"MODEL {model!r}: its config has no num_hidden_layers")
    return int(n)
