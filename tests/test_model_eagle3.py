"""EAGLE-3 draft: vLLM-facing names/config, save/load, multi-layer shape, inference API."""

from __future__ import annotations

import pytest
import torch

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel, logits_to_target_vocab


def tiny_config(**kw) -> Eagle3Config:
    base = dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=50, draft_vocab_size=20, num_layers=1,
        verifier_name_or_path="/models/verifier", verifier_architectures=["LlamaForCausalLM"],
    )
    base.update(kw)
    return Eagle3Config(**base)


@pytest.mark.slow
def test_vllm_loads_saved_checkpoints(tiny_llama, tmp_path):
    """vLLM's own config reader and Eagle3 Llama loader (tests/support/vllm_loadable.py) take 1- and
    2-layer checkpoints, reduced or whole vocabulary; a checkpoint missing a tensor or naming one wrongly is caught."""
    from safetensors.torch import load_file, save_file
    from tests.support.vllm_loadable import check_report, vllm_load_reports

    from speculators.verifier import read_verifier_config

    vconf = read_verifier_config(str(tiny_llama))
    dirs = []
    for n, vocab in ((1, 40), (2, 40), (1, vconf.vocab_size)):  # the last keeps the whole vocabulary
        cfg = Eagle3Config.from_verifier_config(vconf, draft_vocab_size=vocab, num_layers=n,
                                                verifier_name_or_path=str(tiny_llama))
        Eagle3DraftModel(cfg).save_pretrained(tmp_path / f"l{n}v{vocab}")
        dirs.append(tmp_path / f"l{n}v{vocab}")
    full = Eagle3DraftModel.from_pretrained(dirs[2])  # no d2t/t2d saved: the identity mapping
    assert torch.equal(full.d2t, torch.zeros(vconf.vocab_size, dtype=torch.long)) and bool(full.t2d.all())
    cfg = Eagle3Config.from_verifier_config(vconf, draft_vocab_size=40, num_layers=2,
                                            verifier_name_or_path=str(tiny_llama))
    broken = tmp_path / "broken"
    Eagle3DraftModel(cfg).save_pretrained(broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["norm.weight"]
    save_file(state, str(broken / "model.safetensors"))

    renamed = tmp_path / "renamed"
    Eagle3DraftModel(cfg).save_pretrained(renamed)
    state = load_file(str(renamed / "model.safetensors"))
    state["layers.0.mlp.upper_proj.weight"] = state.pop("layers.0.mlp.up_proj.weight")
    save_file(state, str(renamed / "model.safetensors"))

    reports = vllm_load_reports([*dirs, broken, renamed], tiny_llama)
    for directory, report, n, vocab in zip(dirs, reports, (1, 2, 1), (40, 40, vconf.vocab_size)):
        check_report(directory, report)
        assert report["num_hidden_layers"] == n and report["draft_vocab_size"] == vocab
        assert "model.layers.0.self_attn.qkv_proj.weight" in report["params"]
    assert ("draft_id_to_target_id" in reports[0]["params"]) and ("draft_id_to_target_id" not in reports[2]["params"])
    assert "model.norm.weight" in reports[3]["unloaded"]
    # vLLM either refuses the unknown name or leaves the up half of gate_up_proj unloaded
    assert "error" in reports[4] or "model.layers.0.mlp.gate_up_proj.weight" in reports[4]["unloaded"], reports[4]


def test_aux_layer_ids_written_only_when_not_default():
    assert "eagle_aux_hidden_state_layer_ids" not in tiny_config().to_speculators_dict()
    d = tiny_config(aux_layer_ids=[1, 3, 5]).to_speculators_dict()
    assert d["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]


def test_from_verifier_config_keeps_gqa_head_dim_and_rope_scaling():
    from transformers import Qwen3Config

    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    vc = Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, num_hidden_layers=8, vocab_size=300, rope_parameters=rope)
    cfg = Eagle3Config.from_verifier_config(vc, draft_vocab_size=100, aux_layer_ids=[2, 4, 5])
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.draft_vocab_size) == (32, 2, 100)
    assert cfg.aux_layer_ids is None  # [2, n//2, n-3] is the default
    tl = cfg.transformer_layer_config()
    assert tl["rope_theta"] == 50000.0 and tl["rope_scaling"]["factor"] == 2.0
    again = Eagle3Config.from_speculators_dict(cfg.to_speculators_dict())
    assert again == cfg


def test_roundtrip_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config(num_layers=2))
    d2t = torch.arange(20) * 2 - torch.arange(20)  # draft i -> verifier 2i
    t2d = torch.zeros(50, dtype=torch.bool)
    t2d[torch.arange(20) * 2] = True
    model.set_vocab_mapping(d2t, t2d)
    model.save_pretrained(tmp_path)
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.draft_to_target(torch.tensor([0, 3])).tolist() == [0, 6]


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        Eagle3DraftModel.from_pretrained(tmp_path)
    Eagle3DraftModel(tiny_config()).config.save(tmp_path)
    with pytest.raises(UserError, match="model.safetensors"):
        Eagle3DraftModel.from_pretrained(tmp_path)


def _inputs(b=1, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, 96, generator=g),
        torch.randint(0, 50, (b, t), generator=g),
        torch.arange(1, t + 1).expand(b, t),
    )


@pytest.mark.parametrize("num_layers", [1, 2])
def test_ttt_step0_equals_causal_inference_forward(num_layers):
    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config(num_layers=num_layers))
    hs, ids, pos = _inputs()
    docs = torch.zeros_like(ids)
    with torch.no_grad():
        ttt = model(hs, ids, docs, pos, ttt_steps=1)[0]
    inf = model.draft_forward(hs, ids, pos).logits
    torch.testing.assert_close(ttt, inf, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config(num_layers=2))
    hs, ids, pos = _inputs(t=8)
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        packed = model(hs, ids, docs, pos, ttt_steps=2)
        second = model(hs[:, 4:], ids[:, 4:], torch.zeros(1, 4, dtype=torch.long), pos[:, 4:], ttt_steps=2)
    # step 0 of document 1 is independent of document 0
    torch.testing.assert_close(packed[0][:, 4:], second[0], atol=1e-5, rtol=1e-5)


def test_cached_drafting_matches_recomputation():
    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config(num_layers=2))
    hs, ids, pos = _inputs(t=6)
    full = model.draft_forward(hs, ids, pos)
    first = model.draft_forward(hs[:, :4], ids[:, :4], pos[:, :4])
    rest = model.draft_forward(hs[:, 4:], ids[:, 4:], pos[:, 4:], first.cache)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits, atol=1e-5, rtol=1e-5)
    assert rest.cache.length == 6
    rest.cache.truncate(5)
    assert rest.cache.length == 5


def test_propose_returns_verifier_ids_and_chains_its_hidden_state():
    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config())
    model.d2t.fill_(3)  # draft i -> verifier i + 3
    hs, ids, pos = _inputs(t=5)
    tokens, cache = model.propose(hs, ids, num_tokens=3)
    assert tokens.shape == (1, 3) and cache.length == 5 + 2
    assert (tokens >= 3).all() and (tokens < 23).all()
    # the first drafted token is the argmax of a plain forward at the last position
    first = model.draft_forward(hs, ids, pos).logits[:, -1].argmax(-1) + 3
    assert tokens[0, 0] == first[0]


def test_logits_to_target_vocab_scatters_by_d2t():
    logits = torch.tensor([[1.0, 2.0]])
    out = logits_to_target_vocab(logits, torch.tensor([1, 2]), 5)
    assert out.tolist() == [[float("-inf"), 1.0, float("-inf"), 2.0, float("-inf")]]


@pytest.mark.parametrize("impl", ["sdpa", "flex_eager"])
def test_ttt_forward_under_bf16_autocast(impl):
    """The GPU recipe (bf16 autocast) keeps q/k/v dtypes consistent for both kernels."""
    import warnings

    torch.manual_seed(0)
    model = Eagle3DraftModel(tiny_config(num_layers=2))
    model.attn_impl = impl
    hs, ids, pos = _inputs(b=2, t=6)
    docs = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(hs.bfloat16(), ids, docs, pos, ttt_steps=3)
        ref = model(hs, ids, docs, pos, ttt_steps=3)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.1)
