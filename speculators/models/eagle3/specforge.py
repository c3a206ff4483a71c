"""Convert a SpecForge EAGLE-3 draft checkpoint into this package's (speculators) format.

SpecForge (sgl-project/SpecForge) saves its Llama EAGLE-3 draft as a flat `LlamaConfig`
`config.json` (`architectures: ["LlamaForCausalLMEagle3"]`, plus `draft_vocab_size`,
optional `target_hidden_size`, `eagle_config.eagle_aux_hidden_state_layer_ids` and the
EAGLE-3.1 flags `norm_before_fc` / `fc_norm` / `norm_output`) and these tensors:

    SpecForge                                   speculators
    midlayer.self_attn.{q,k,v,o}_proj.weight -> layers.0.self_attn.{q,k,v,o}_proj.weight
    midlayer.mlp.{gate,up,down}_proj.weight  -> layers.0.mlp.{gate,up,down}_proj.weight
    midlayer.hidden_norm.weight              -> layers.0.hidden_norm.weight
    midlayer.input_layernorm.weight          -> layers.0.input_layernorm.weight
    midlayer.post_attention_layernorm.weight -> layers.0.post_attention_layernorm.weight
    fc.weight, norm.weight, lm_head.weight   -> same names
    embed_tokens.weight (optional)           -> same (copied from the verifier when absent)
    d2t (int64 offsets), t2d (bool)          -> same
    input_norm.weight, fc_norm.<i>.weight    -> same (EAGLE-3.1)

Its decoder layer keeps the *un-normed* hidden state as layer 0's residual, so the converted
config says `norm_before_residual: false`.  Any other tensor or config option is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from speculators.errors import UserError

SPECFORGE_ARCHITECTURES = ("LlamaForCausalLMEagle3",)
_LAYER_KEYS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "hidden_norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)
_TOP_KEYS = ("fc.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight", "d2t", "t2d", "input_norm.weight")
# config.json keys SpecForge writes that carry no forward behaviour.
_METADATA = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "transformers_version", "torch_dtype", "dtype", "tie_word_embeddings", "_name_or_path", "max_window_layers",
}
_READ = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "draft_vocab_size", "rms_norm_eps", "hidden_act", "max_position_embeddings",
    "attention_bias", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters", "target_hidden_size",
    "eagle_config", "norm_before_fc", "fc_norm", "norm_output", "sliding_window", "use_sliding_window",
    "attention_dropout", "pretraining_tp",
}


def map_tensor_name(name: str) -> str:
    """SpecForge tensor name -> speculators tensor name (UserError for unknown names)."""
    if name.startswith("midlayer."):
        rest = name[len("midlayer."):]
        if rest in _LAYER_KEYS:
            return f"layers.0.{rest}"
    elif name in _TOP_KEYS or (name.startswith("fc_norm.") and name.endswith(".weight")):
        return name
    raise UserError(
        f"SpecForge tensor {name!r} has no counterpart in the speculators EAGLE-3 draft; "
        "only single-midlayer Llama EAGLE-3 drafts are converted"
    )


def read_specforge(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and all tensors of a SpecForge checkpoint directory."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; pass a SpecForge checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    arch = config.get("architectures") or []
    if not any(a in SPECFORGE_ARCHITECTURES for a in arch):
        raise UserError(f"{path}: architectures {arch} is not a SpecForge Llama EAGLE-3 draft "
                        f"({', '.join(SPECFORGE_ARCHITECTURES)})")
    return config, _read_tensors(directory)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise UserError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")


def speculators_config_dict(config: dict[str, Any], verifier: str, verifier_architectures: list[str],
                            speculative_tokens: int) -> dict[str, Any]:
    """The speculators eagle3 config.json for a SpecForge config (strict about unknown keys)."""
    unknown = sorted(set(config) - _METADATA - _READ)
    if unknown:
        raise UserError(f"SpecForge config key(s) {unknown} not implemented by the speculators draft; refusing to convert")
    if config.get("model_type", "llama") != "llama":
        raise UserError(f"SpecForge config model_type {config.get('model_type')!r}: only llama drafts are converted")
    if config.get("num_hidden_layers", 1) != 1:
        raise UserError(f"SpecForge config num_hidden_layers {config['num_hidden_layers']}: only one midlayer is converted")
    if config.get("use_sliding_window"):
        raise UserError("SpecForge config use_sliding_window is true; sliding-window SpecForge drafts are not converted")
    eagle = config.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is False:
        raise UserError("SpecForge eagle_config.use_aux_hidden_state is false (EAGLE-1 style); not an EAGLE-3 draft")
    layer = {k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rms_norm_eps", "hidden_act", "max_position_embeddings", "attention_bias", "mlp_bias", "rope_theta",
        "rope_scaling", "rope_parameters", "attention_dropout", "pretraining_tp") if config.get(k) is not None}
    layer.update(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=1, tie_word_embeddings=False)
    layer.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    out: dict[str, Any] = {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": layer,
        "draft_vocab_size": config.get("draft_vocab_size") or config["vocab_size"],
        "norm_before_residual": False,
        "norm_before_fc": bool(config.get("norm_before_fc", False)),
        "fc_norm": bool(config.get("fc_norm", False)),
        "norm_output": bool(config.get("norm_output", False)),
        "target_hidden_size": config.get("target_hidden_size"),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
    }
    ids = eagle.get("eagle_aux_hidden_state_layer_ids")
    if ids:
        out["eagle_aux_hidden_state_layer_ids"] = list(ids)
    return out


def convert_specforge(source: str | Path, output: str | Path, verifier: str, speculative_tokens: int = 3) -> Path:
    """Write `output/` (config.json + model.safetensors) from a SpecForge checkpoint; returns it.

    The converted draft is loaded back through `Eagle3DraftModel.from_pretrained`, so every
    tensor is checked against its config before the command reports success.
    """
    from safetensors.torch import save_file

    from speculators.models.eagle3.config import Eagle3Config
    from speculators.models.eagle3.model import Eagle3DraftModel
    from speculators.models.weights_io import WEIGHTS_NAME
    from speculators.verifier import load_verifier_weights, read_verifier_config

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} exists and is not empty; choose a new directory")
    config, tensors = read_specforge(source)
    vconf = read_verifier_config(verifier, flag="--verifier")
    if vconf.hidden_size != (config.get("target_hidden_size") or config["hidden_size"]):
        raise UserError(f"--verifier {verifier}: hidden size {vconf.hidden_size} does not match the draft's "
                        f"{config.get('target_hidden_size') or config['hidden_size']}")
    verifier_ref = str(Path(verifier).resolve()) if Path(verifier).is_dir() else verifier
    spec = speculators_config_dict(config, verifier_ref, list(getattr(vconf, "architectures", None) or []),
                                   speculative_tokens)
    Eagle3Config.from_speculators_dict(spec, source=f"{source}/config.json")  # validates the option set
    state = {map_tensor_name(k): v.contiguous() for k, v in tensors.items()}
    if "embed_tokens.weight" not in state:
        state["embed_tokens.weight"] = load_verifier_weights(verifier, vconf)["embed"].to(state["fc.weight"].dtype)
    dv = spec["draft_vocab_size"]
    state.setdefault("d2t", torch.zeros(dv, dtype=torch.long))
    if "t2d" not in state:
        t2d = torch.zeros(config["vocab_size"], dtype=torch.bool)
        t2d[:dv] = True
        state["t2d"] = t2d
    state["d2t"], state["t2d"] = state["d2t"].to(torch.long), state["t2d"].to(torch.bool)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
    save_file(state, str(output / WEIGHTS_NAME), metadata={"format": "pt", "converted_from": "specforge"})
    try:
        Eagle3DraftModel.from_pretrained(output)
    except UserError as exc:
        import shutil

        shutil.rmtree(output)  # it was empty or absent before; leave no half-converted draft
        raise UserError(f"{source}: converted draft does not load ({exc}); nothing else was changed") from exc
    return output
