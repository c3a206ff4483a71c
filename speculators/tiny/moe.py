"""Tiny random MoE verifiers built locally: gpt-oss (transformers' GptOss classes, harmony
template) and Qwen3-MoE (Qwen3 ChatML template with <think>), for the pipeline tests and the
examples' `--tiny` stand-ins.

Same architecture classes as the real gpt-oss-20b / Qwen3-30B-A3B (router + experts,
gpt-oss' attention sinks and alternating sliding/full attention), a few hundred
thousand parameters, bf16-free (float32) so they run on the CPU.
"""

from __future__ import annotations

from pathlib import Path

from speculators.tiny.families import end_of_turn, family_tokenizer

FAMILY = {"gpt_oss": "harmony", "qwen3_moe": "qwen3"}


def moe_config(arch: str, vocab_size: int, eos: list[int], pad: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=8, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
                  eos_token_id=eos, pad_token_id=pad, rms_norm_eps=1e-6)
    if arch == "gpt_oss":
        from transformers import GptOssConfig

        return GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                            rope_parameters={"rope_type": "default", "rope_theta": 150000.0}, **common)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              decoder_sparse_step=1, **common)
    raise ValueError(f"arch must be one of {sorted(FAMILY)}, got {arch!r}")


def build_tiny_moe_verifier(output_dir: str | Path, arch: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(output_dir)
    name = FAMILY[arch]
    tok = family_tokenizer(name)
    eos = sorted(end_of_turn(tok, name))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch, len(tok), eos, tok.pad_token_id), dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out
