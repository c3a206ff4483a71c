"""Which verifier layers vLLM exports, in vLLM's numbering.

vLLM's `eagle_aux_hidden_state_layer_ids` counts like the `hidden_states` tuple of a
Hugging Face forward: id ``i`` is the residual stream entering decoder layer ``i``
(the output of layer ``i - 1``), and id ``num_hidden_layers`` is the last layer's
output before the final norm. EAGLE-3 wants three aux layers plus that final one.
"""

from __future__ import annotations

from typing import Sequence

from speculators.errors import UserError


def default_layer_ids(num_hidden_layers: int) -> list[int]:
    """Low, middle and high aux layers plus the final layer: ``[2, n//2, n-3, n]``."""
    n = int(num_hidden_layers)
    if n < 4:
        raise UserError(
            f"the verifier has {n} hidden layers; the default layer choice needs at least 4 "
            "(pass --target-layer-ids explicitly)"
        )
    return [2, n // 2, n - 3, n]


def resolve_layer_ids(
    num_hidden_layers: int,
    target_layer_ids: Sequence[int] | None = None,
    include_last_layer: bool = True,
) -> list[int]:
    """The layer ids to request: the defaults, or the user's list (+ the final layer).

    Raises `UserError` for ids outside ``[0, n]`` or repeated ids, naming
    ``--target-layer-ids``.
    """
    n = int(num_hidden_layers)
    if not target_layer_ids:
        return default_layer_ids(n)
    ids = [int(i) for i in target_layer_ids]
    if include_last_layer and n not in ids:
        ids.append(n)
    bad = [i for i in ids if not 0 <= i <= n]
    if bad:
        raise UserError(
            f"--target-layer-ids {bad} out of range: the verifier has {n} layers, ids must be "
            f"in [0, {n}] ({n} = final layer output)"
        )
    if len(set(ids)) != len(ids):
        raise UserError(f"--target-layer-ids {ids} repeats a layer; give each layer once")
    if len(ids) < 2:
        raise UserError(
            f"--target-layer-ids {ids}: EAGLE-3 needs at least one aux layer plus the final layer"
        )
    return ids


def num_hidden_layers_of(model: str, trust_remote_code: bool = False) -> int:
    """Read ``num_hidden_layers`` from a model's config (text config for multimodal models)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of MODEL {model!r}: {exc}") from exc
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"MODEL {model!r}: its config has no num_hidden_layers")
    return int(n)
