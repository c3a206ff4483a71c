"""The draft decoder layers' shape, shared by the EAGLE-3 and DFlash configs: read from the
verifier's config (GQA, head_dim, RoPE) and written as a Llama/Qwen3-style
``transformer_layer_config`` dict. Pure functions, so both algorithms write the same keys."""

from __future__ import annotations

import copy
from typing import Any

from speculators.verifier import text_config


def rope_parameters(vc: Any) -> dict[str, Any]:
    """The verifier's RoPE settings as one dict (rope_type, rope_theta, scaling keys)."""
    rope = getattr(vc, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        # Per-layer-type dicts (e.g. {"full_attention": {...}}) -> take full attention.
        if "rope_type" not in rope and "full_attention" in rope:
            rope = rope["full_attention"]
        out = dict(rope)
    else:
        out = dict(getattr(vc, "rope_scaling", None) or {})
        if "type" in out and "rope_type" not in out:
            out["rope_type"] = out.pop("type")
        out.setdefault("rope_theta", getattr(vc, "rope_theta", 10000.0))
    out.setdefault("rope_type", "default")
    out.setdefault("rope_theta", 10000.0)
    return out


def verifier_layer_shape(verifier_config: Any) -> dict[str, Any]:
    """The fields of a draft layer shaped like one verifier decoder layer, by config field name
    (hidden_size ... mlp_bias, vocab_size, verifier_architectures)."""
    vc = text_config(verifier_config)
    heads = vc.num_attention_heads
    return {
        "hidden_size": vc.hidden_size,
        "intermediate_size": vc.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(vc, "num_key_value_heads", None) or heads,
        "head_dim": getattr(vc, "head_dim", None) or vc.hidden_size // heads,
        "vocab_size": vc.vocab_size,
        "rms_norm_eps": getattr(vc, "rms_norm_eps", 1e-6),
        "hidden_act": getattr(vc, "hidden_act", "silu"),
        "max_position_embeddings": getattr(vc, "max_position_embeddings", 4096),
        "rope_parameters": rope_parameters(vc),
        "attention_bias": bool(getattr(vc, "attention_bias", False)),
        "mlp_bias": bool(getattr(vc, "mlp_bias", False)),
        "verifier_architectures": list(getattr(vc, "architectures", None)
                                       or getattr(verifier_config, "architectures", None) or []),
    }


def transformer_layer_dict(cfg: Any, model_type: str, architecture: str, *, rope_scaling: bool) -> dict[str, Any]:
    """A LlamaConfig- or Qwen3Config-shaped dict of `cfg`'s draft layers (`cfg` has the fields of
    `verifier_layer_shape` plus ``num_layers``). RoPE is written as `rope_parameters`
    (transformers >= 5) and `rope_theta`; with ``rope_scaling`` also as `rope_scaling` (None for
    default RoPE), the form older readers take."""
    rope = copy.deepcopy(cfg.rope_parameters)
    out = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": False,
        "rope_parameters": rope,
        "rope_theta": rope.get("rope_theta", 10000.0),
    }
    if rope_scaling:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return out
