"""Which config.json keys the draft implements, which are metadata, and which it refuses.

A checkpoint written by another tool (the public speculators package, SpecForge via
`speculators convert`, a future version of this one) may carry options this draft model
does not implement.  Loading such a checkpoint and evaluating it as a plain draft would
report the wrong acceptance without a word, so every key is classified here:

* implemented: read into `Eagle3Config` and written back unchanged;
* metadata: no effect on the draft's forward (token ids, dtype, init range, versions);
* fixed-value: accepted only at the value that means "off" (e.g. `attention_dropout: 0`);
* anything else: refused with a `UserError` naming the key.
"""

from __future__ import annotations

from typing import Any

from speculators.errors import UserError

# Top level of config.json.
TOP_LEVEL_IMPLEMENTED = frozenset({
    "speculators_model_type",
    "transformer_layer_config",
    "draft_vocab_size",
    "norm_before_residual",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids",
    "speculators_config",
    "embed_requires_grad",
})
TOP_LEVEL_METADATA = frozenset({
    "architectures",
    "auto_map",  # the public package's transformers auto-class hook
    "tie_word_embeddings",
    "speculators_version",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
})

# `transformer_layer_config`.
LAYER_IMPLEMENTED = frozenset({
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "hidden_act",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
})
LAYER_METADATA = frozenset({
    "architectures",
    "tie_word_embeddings",  # the draft always has its own lm_head tensor
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
})
# Options accepted only at the value under which they do nothing.
LAYER_FIXED = {
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "partial_rotary_factor": 1.0,
    "logit_scale": 1.0,
}

TOP_LEVEL_KNOWN = TOP_LEVEL_IMPLEMENTED | TOP_LEVEL_METADATA
LAYER_KNOWN = LAYER_IMPLEMENTED | LAYER_METADATA | frozenset(LAYER_FIXED)


def check_known_keys(d: dict[str, Any], source: str) -> None:
    """Refuse any option of `d` (a speculators eagle3 config dict) the draft does not implement."""
    for key in d:
        if key not in TOP_LEVEL_KNOWN:
            raise UserError(
                f"{source}: config key {key!r} is not implemented by this draft model; "
                "loading would evaluate a different model. Remove the key only if you know it "
                "has no effect, or train the draft with this tool"
            )
    tl = d["transformer_layer_config"]
    if not isinstance(tl, dict):
        raise UserError(f"{source}: transformer_layer_config must be a JSON object")
    for key, value in tl.items():
        if key not in LAYER_KNOWN:
            raise UserError(
                f"{source}: transformer_layer_config.{key} is not implemented by this draft model "
                "(draft layers are Llama- or Qwen3-style); refusing to load a different model"
            )
        if key in LAYER_FIXED and value is not None and value != LAYER_FIXED[key]:
            raise UserError(
                f"{source}: transformer_layer_config.{key} = {value!r} is not implemented "
                f"(only {LAYER_FIXED[key]!r})"
            )
    model_type = tl.get("model_type", "llama")
    if model_type not in ("llama", "qwen3"):
        raise UserError(
            f"{source}: transformer_layer_config.model_type {model_type!r} is not implemented; "
            "draft layers may be 'llama' or 'qwen3'"
        )
    if tl.get("use_sliding_window") and tl.get("layer_types") is None:
        # transformers' Qwen3Config would derive per-layer windows from max_window_layers,
        # vLLM reads only layer_types: the two disagree, so refuse rather than guess.
        raise UserError(
            f"{source}: transformer_layer_config.use_sliding_window is true but layer_types is "
            "missing; add layer_types (one 'full_attention'/'sliding_attention' per draft layer)"
        )
    if d.get("norm_before_fc") and d.get("fc_norm"):
        raise UserError(f"{source}: norm_before_fc and fc_norm are both true; they are mutually exclusive")


def sliding_layer_types(
    num_layers: int, sliding_window: int | None, full_attention_indices: list[int] | None
) -> list[str] | None:
    """Per-layer attention types for `--sliding-window N [--full-attention-indices ...]`.

    None when no window is asked for (every layer full attention, nothing written).
    """
    if not sliding_window:
        if full_attention_indices:
            raise UserError("--full-attention-indices needs --sliding-window")
        return None
    if sliding_window < 1:
        raise UserError(f"--sliding-window must be a positive number of tokens, got {sliding_window}")
    full = set(full_attention_indices or [])
    bad = sorted(i for i in full if not 0 <= i < num_layers)
    if bad:
        raise UserError(f"--full-attention-indices {bad} out of range for {num_layers} draft layers")
    return ["full_attention" if i in full else "sliding_attention" for i in range(num_layers)]
