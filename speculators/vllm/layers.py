"""Which verifier layers vLLM exports, in vLLM's numbering.

vLLM's `eagle_aux_hidden_state_layer_ids` counts like the `hidden_states` tuple of a
Hugging Face forward: id ``i`` is the residual stream entering decoder layer ``i``
(the output of layer ``i - 1``), and id ``num_hidden_layers`` is the last layer's
output before the final norm. EAGLE-3 wants three aux layers plus that final one.
"""

from __future__ import annotations

from typing import Any, Sequence

from speculators.errors import UserError
from speculators.layers import resolve_layer_ids as _resolve


def resolve_layer_ids(
    num_hidden_layers: int,
    target_layer_ids: Sequence[int] | None = None,
    include_last_layer: bool = True,
) -> list[int]:
    """The layer ids to request: the defaults, or the user's list (+ the final layer).

    Raises `UserError` for ids outside ``[0, n]`` or repeated ids, naming
    ``--target-layer-ids``.
    """
    return _resolve(
        target_layer_ids,
        int(num_hidden_layers),
        include_last_layer=include_last_layer,
        flag="--target-layer-ids",
        require_final=include_last_layer,
    )


def text_config_of(model: str, trust_remote_code: bool = False) -> Any:
    """A model's config; for multimodal models, the text model's config."""
    from speculators.verifier import read_verifier_config

    return read_verifier_config(model, flag="MODEL", trust_remote_code=trust_remote_code)


def num_hidden_layers_of(model: str, trust_remote_code: bool = False, text_config: Any = None) -> int:
    """Read ``num_hidden_layers`` from a model's (text) config."""
    text = text_config if text_config is not None else text_config_of(model, trust_remote_code)
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"MODEL {model!r}: its config has no num_hidden_layers")
    return int(n)
