"""Build a draft checkpoint in SpecForge's EAGLE-3 layout, by hand (no code of ours involved).

Layout facts (sgl-project/SpecForge, `LlamaForCausalLMEagle3` and its configs/*.json): a flat
LlamaConfig-style config.json with `architectures: ["LlamaForCausalLMEagle3"]`, `draft_vocab_size`
and, for EAGLE-3.1 drafts, `fc_norm` / `norm_output` at the top level; tensors `midlayer.*` for
the single decoder layer, `fc`, `norm`, `lm_head`, `embed_tokens`, `d2t` (offsets), `t2d`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def build_specforge_draft(directory: Path, verifier_dir: Path, seed: int = 0, draft_vocab: int = 256,
                          fc_norm: bool = True, norm_output: bool = True) -> Path:
    vc = json.loads((Path(verifier_dir) / "config.json").read_text())
    h, inter, heads, kv = vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"], vc["num_key_value_heads"]
    hd = vc.get("head_dim") or h // heads
    vocab = vc["vocab_size"]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": vc.get("bos_token_id"), "eos_token_id": vc.get("eos_token_id"),
        "head_dim": hd, "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02,
        "intermediate_size": inter, "max_position_embeddings": 2048, "max_window_layers": 48,
        "num_attention_heads": heads, "num_hidden_layers": 1, "num_key_value_heads": kv, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": vc.get("rope_theta") or 10000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.53.2",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab, "draft_vocab_size": draft_vocab,
    }
    if fc_norm:
        config["fc_norm"] = True
    if norm_output:
        config["norm_output"] = True
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.15

    def n(size):
        return 1 + 0.3 * torch.randn(size, generator=g)

    tensors = {
        "midlayer.self_attn.q_proj.weight": w(heads * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * hd),
        "midlayer.mlp.gate_proj.weight": w(inter, h),
        "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        "midlayer.hidden_norm.weight": n(h),
        "midlayer.input_layernorm.weight": n(h),
        "midlayer.post_attention_layernorm.weight": n(h),
        "fc.weight": w(h, 3 * h),
        "norm.weight": n(h),
        "lm_head.weight": w(draft_vocab, h),
        "d2t": torch.zeros(draft_vocab, dtype=torch.long),
        "t2d": torch.arange(vocab) < draft_vocab,
    }
    if fc_norm:
        tensors.update({f"fc_norm.{i}.weight": n(h) for i in range(3)})
    embed = [v for k, v in load_file(str(Path(verifier_dir) / "model.safetensors")).items() if k.endswith("embed_tokens.weight")]
    tensors["embed_tokens.weight"] = embed[0].float().clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory
