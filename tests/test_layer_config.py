"""The draft layers' shape and `transformer_layer_config` (speculators.models.layer_config), shared by
EAGLE-3 and DFlash: checked against transformers' own config classes reading the written dict."""

from __future__ import annotations

from transformers import LlamaConfig, Qwen3Config

from speculators.models.dflash.config import DFlashConfig
from speculators.models.eagle3.config import Eagle3Config

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}


def _verifier() -> Qwen3Config:
    # GQA (4 heads, 1 KV head), a head_dim that is not hidden/heads, YaRN, attention bias
    return Qwen3Config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=48, num_hidden_layers=6, vocab_size=500, rope_scaling=dict(YARN),
                       rope_theta=5e5, attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=2048,
                       architectures=["Qwen3ForCausalLM"])


def _reread(layer: dict):
    """What transformers makes of the written dict (its class by model_type)."""
    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[layer["model_type"]]
    return cls(**{k: v for k, v in layer.items() if k != "model_type"})


def test_both_drafts_write_a_layer_transformers_reads_as_the_verifiers_shape():
    vc = _verifier()
    eagle = Eagle3Config.from_verifier_config(vc, num_layers=2, draft_arch="llama", aux_layer_ids=[1, 2, 3])
    dflash = DFlashConfig.from_verifier_config(vc, aux_layer_ids=[1, 3], block_size=4, num_layers=3)
    for cfg, layers in ((eagle, 2), (dflash, 3)):
        layer = cfg.transformer_layer_config()
        got = _reread(layer)
        assert got.num_hidden_layers == layers
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "vocab_size", "rms_norm_eps", "max_position_embeddings", "attention_bias"):
            assert getattr(got, key) == getattr(vc, key), (type(cfg).__name__, key)
        rope = got.rope_parameters
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == 5e5
        assert layer["tie_word_embeddings"] is False
    assert eagle.transformer_layer_config()["architectures"] == ["LlamaForCausalLM"]
    assert dflash.transformer_layer_config()["architectures"] == ["Qwen3ForCausalLM"]
    assert eagle.verifier_architectures == dflash.verifier_architectures == ["Qwen3ForCausalLM"]


def test_only_eagle3_writes_the_legacy_rope_scaling_key():
    vc = _verifier()
    eagle = Eagle3Config.from_verifier_config(vc).transformer_layer_config()
    assert eagle["rope_scaling"] == {k: v for k, v in eagle["rope_parameters"].items() if k != "rope_theta"}
    assert "rope_scaling" not in DFlashConfig.from_verifier_config(vc, aux_layer_ids=[1], block_size=2) \
        .transformer_layer_config()  # the DFlash format never had it
    plain = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4,
                        vocab_size=300)
    layer = Eagle3Config.from_verifier_config(plain).transformer_layer_config()
    assert layer["rope_scaling"] is None and layer["head_dim"] == 16 and layer["num_key_value_heads"] == 4
