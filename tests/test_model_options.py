"""Draft options (qwen3 layers, norm_before_fc, fc_norm, norm_output, sliding windows): config
round trip over every key, training and inference forwards agree, the trainer trains them and
writes them, and conflicting or unimplemented settings are refused."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa, windowed
from speculators.models.eagle3.config_keys import LAYER_IMPLEMENTED, TOP_LEVEL_IMPLEMENTED
from speculators.models.eagle3.ttt_mask import context_mask, ttt_mask_dense

OPTION_SETS = {
    "qwen3": dict(draft_arch="qwen3"),
    "norm_before_fc+norm_output": dict(norm_before_fc=True, norm_output=True),
    "fc_norm": dict(fc_norm=True),
    "sliding": dict(num_layers=2, layer_types=["sliding_attention", "sliding_attention"], sliding_window=3),
    "mixed_sliding_qwen3": dict(draft_arch="qwen3", num_layers=2, layer_types=["full_attention", "sliding_attention"],
                                sliding_window=2, norm_output=True),
}


def tiny(**kw) -> Eagle3Config:
    base = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                vocab_size=50, draft_vocab_size=20, verifier_name_or_path="/models/v")
    base.update(kw)
    return Eagle3Config(**base)


def randomized(cfg: Eagle3Config, seed: int = 0) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    model = Eagle3DraftModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return model.eval()


def test_every_implemented_key_reads_back_exactly_as_written():
    """Non-default values for every key vLLM or the public package reads survive load + save."""
    written = tiny(num_layers=2).to_speculators_dict()
    tl = written["transformer_layer_config"]
    tl.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=48, intermediate_size=96,
              num_attention_heads=6, num_key_value_heads=3, head_dim=16, vocab_size=60, rms_norm_eps=1e-5,
              hidden_act="gelu", max_position_embeddings=777, attention_bias=True, mlp_bias=True,
              rope_theta=5e5, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
              rope_scaling={"rope_type": "linear", "factor": 2.0},
              layer_types=["sliding_attention", "full_attention"], sliding_window=7, use_sliding_window=True,
              max_window_layers=1)
    written.update(draft_vocab_size=30, norm_before_residual=False, norm_before_fc=False, fc_norm=True,
                   norm_output=True, target_hidden_size=40, eagle_aux_hidden_state_layer_ids=[1, 3, 5, 6],
                   embed_requires_grad=True)
    written["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 5
    written["speculators_config"]["verifier"] = {"name_or_path": "org/model", "architectures": ["X"]}
    back = Eagle3Config.from_speculators_dict(json.loads(json.dumps(written))).to_speculators_dict()
    assert set(TOP_LEVEL_IMPLEMENTED) <= set(written)
    for key in TOP_LEVEL_IMPLEMENTED - {"transformer_layer_config"}:
        assert back[key] == written[key], key
    assert set(LAYER_IMPLEMENTED) <= set(tl)
    for key in LAYER_IMPLEMENTED:
        assert back["transformer_layer_config"][key] == tl[key], key


@pytest.mark.parametrize("key,value", [("norm_before_fc", True), ("fc_norm", True), ("norm_output", True)])
def test_eagle31_flags_are_written_where_vllm_reads_them(key, value):
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    d = tiny(**{key: value}).to_speculators_dict()
    vllm_cfg = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(d)))
    assert vllm_cfg[key] is value


@pytest.mark.parametrize("arch,expected", [("llama", "Eagle3LlamaForCausalLM"), ("qwen3", "Eagle3Qwen3ForCausalLM")])
def test_draft_arch_selects_vllms_draft_class(arch, expected):
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    d = tiny(draft_arch=arch).to_speculators_dict()
    assert SpeculatorsConfig.extract_transformers_pre_trained_config(d)["architectures"] == [expected]


def test_option_tensors_have_vllms_names(tmp_path):
    model = Eagle3DraftModel(tiny(draft_arch="qwen3", norm_before_fc=True, num_layers=2))
    model.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"input_norm.weight", "layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight",
            "layers.1.self_attn.q_norm.weight"} <= names
    model = Eagle3DraftModel(tiny(fc_norm=True))
    model.save_pretrained(tmp_path)
    assert {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"} <= set(load_file(str(tmp_path / "model.safetensors")))


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_ttt_step0_equals_cached_inference_with_options(name):
    model = randomized(tiny(**OPTION_SETS[name]))
    g = torch.Generator().manual_seed(1)
    hs, ids = torch.randn(1, 12, 96, generator=g), torch.randint(0, 50, (1, 12), generator=g)
    pos = torch.arange(1, 13)[None]
    with torch.no_grad():
        ttt = model(hs, ids, torch.zeros_like(ids), pos, ttt_steps=1)[0]
        whole = model.draft_forward(hs, ids, pos).logits
        first = model.draft_forward(hs[:, :7], ids[:, :7], pos[:, :7])  # then the rest, cached
        rest = model.draft_forward(hs[:, 7:], ids[:, 7:], pos[:, 7:], first.cache)
    torch.testing.assert_close(ttt, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_ttt_step1_at_the_last_position_equals_the_drafting_chain(name):
    """TTT step 1 at the last position is inference's second drafted token (same hidden fed back)."""
    model = randomized(tiny(**OPTION_SETS[name]))
    g = torch.Generator().manual_seed(2)
    hs, ids = torch.randn(1, 10, 96, generator=g), torch.randint(0, 50, (1, 11), generator=g)
    pos = torch.arange(1, 11)[None]
    with torch.no_grad():
        # TTT row: the token after the last one is ids[10]; step 1 at position 8 consumes ids[10]
        steps = model(hs, ids[:, 1:], torch.zeros(1, 10, dtype=torch.long), pos, ttt_steps=2)
        out = model.draft_forward(hs[:, :9], ids[:, 1:10], pos[:, :9])
        nxt = model.draft_forward(out.hidden_prenorm[:, -1:], ids[:, 10:11], pos[:, 9:10] , out.cache, fused=True)
    torch.testing.assert_close(steps[1][:, 8], nxt.logits[:, 0], atol=1e-5, rtol=1e-5)


def test_windowed_sdpa_and_flex_masks_agree_with_the_dense_rule():
    docs = torch.tensor([[0] * 6 + [1] * 5 + [-1]])
    w = 3
    t = docs.shape[1]
    dense = ttt_mask_dense(docs, 2).clone()
    pos = torch.arange(t)
    dense[:, :, :t] &= (pos[:, None] - pos[None, :]) < w
    dense[:, :, :t] |= torch.eye(t, dtype=torch.bool)
    torch.testing.assert_close(windowed(context_mask(docs), w), dense[:, :, :t])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, t, 8, generator=g)
    keys = [torch.randn(1, 2, t, 8, generator=g) for _ in range(3)]
    values = [torch.randn(1, 2, t, 8, generator=g) for _ in range(3)]
    ref = ttt_attention_sdpa(q, keys, values, windowed(context_mask(docs), w), 0.3)
    flex = ttt_attention_flex(q, keys, values, docs, 0.3, {}, compile=False, window=w)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(norm_before_fc=True, fc_norm=True), "mutually exclusive"),
    (dict(draft_arch="gemma"), "draft_arch"),
    (dict(num_layers=2, layer_types=["sliding_attention"], sliding_window=4), "layer_types"),
    (dict(layer_types=["sliding_attention"]), "sliding_window"),
])
def test_bad_option_combinations_are_refused(bad, match):
    with pytest.raises(UserError, match=match):
        tiny(**bad)


def test_use_sliding_window_without_layer_types_is_refused(tmp_path):
    d = tiny().to_speculators_dict()
    d["transformer_layer_config"].update(use_sliding_window=True, sliding_window=16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="layer_types"):
        Eagle3Config.load(tmp_path)


def test_train_flags_reach_the_config():
    from speculators.train.cli import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--verifier-name-or-path", "v", "--draft-arch", "qwen3", "--norm-before-fc",
                         "--norm-output", "--sliding-window", "64", "--full-attention-indices", "0"])
    cfg = config_from_args(args)
    assert (cfg.draft_arch, cfg.norm_before_fc, cfg.fc_norm, cfg.norm_output, cfg.sliding_window,
            cfg.full_attention_indices) == ("qwen3", True, False, True, 64, [0])


@pytest.fixture(scope="module")
def hs_data(tiny_qwen3, tmp_path_factory):
    from tests.support.synthetic import write_synthetic_hidden_states

    return write_synthetic_hidden_states(tiny_qwen3, tmp_path_factory.mktemp("hs_opts"), num_samples=12, seq_len=32)


def test_trainer_trains_and_writes_the_options(tiny_qwen3, hs_data, tmp_path):
    from speculators.config.train import TrainConfig
    from speculators.train.metrics_stream import read_metrics
    from speculators.train.trainer import run_training

    save = tmp_path / "run"
    base = dict(verifier_name_or_path=str(tiny_qwen3), data_path=str(hs_data), epochs=3, lr=3e-3,
                total_seq_len=64, ttt_steps=2, log_freq=1000, train_data_ratio=0.75, warmup_steps=1)
    run_training(TrainConfig(save_path=str(save), num_layers=2, draft_arch="qwen3", norm_before_fc=True,
                             norm_output=True, sliding_window=8, **base))
    cfg = json.loads((save / "2" / "config.json").read_text())
    tl = cfg["transformer_layer_config"]
    assert (cfg["norm_before_fc"], cfg["norm_output"], cfg["fc_norm"]) == (True, True, False)
    assert tl["model_type"] == "qwen3" and tl["layer_types"] == ["sliding_attention"] * 2 and tl["sliding_window"] == 8
    state = load_file(str(save / "2" / "model.safetensors"))
    # the option tensors were trained (they start at exactly 1.0)
    for name in ("input_norm.weight", "layers.0.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"):
        assert (state[name] - 1).abs().max() > 1e-4, name
    losses = [r["metrics"]["loss"] for r in read_metrics(save / "metrics.jsonl") if r["type"] == "train"]
    assert losses[-1] < losses[0]
    Eagle3DraftModel.from_pretrained(save / "2")

    # --from-pretrained takes the layout from the checkpoint; a conflicting flag is refused
    with pytest.raises(UserError, match="fc_norm"):
        run_training(TrainConfig(save_path=str(tmp_path / "b"), from_pretrained=str(save / "2"), fc_norm=True, **base))
