"""The embedded default verifier: deterministic bytes, cached by recipe, vLLM-CPU-shaped."""

from __future__ import annotations

import json

import pytest

from speculators.tiny import default as d

# Same code path as the default, a few steps only (the real recipe trains for minutes).
SMALL = d.VerifierRecipe(vocab_size=400, tokenizer_records=200, corpus_tokens=4000, steps=4, warmup=2,
                         num_layers=7, eval_prompts=2, eval_new_tokens=8)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """SMALL built through the cache (module scope: built once for these tests)."""
    import os

    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SPECULATORS_CACHE")
    os.environ["SPECULATORS_CACHE"] = str(root)
    lines: list[str] = []
    try:
        path = d.default_verifier(SMALL, progress=lines.append)
    finally:
        if old is None:
            os.environ.pop("SPECULATORS_CACHE")
        else:
            os.environ["SPECULATORS_CACHE"] = old
    return root, path, lines


def test_two_builds_are_byte_identical(cached, tmp_path):
    root, a, lines = cached
    assert a == root / "verifiers" / SMALL.digest()
    b = d.build_default_verifier(tmp_path / "b", SMALL, progress=lambda s: None)
    assert d.dir_hash(a) == d.dir_hash(b)
    names = {p.name for p in a.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", d.CARD} <= names
    card = json.loads((a / d.CARD).read_text())
    assert card["recipe_hash"] == SMALL.digest()
    assert {"distinct_tokens_per_reply", "heldout_perplexity"} <= set(card["quality"])
    assert any("step 4/4" in line for line in lines)


def test_weights_sit_on_the_bfloat16_grid(cached):
    import torch
    from safetensors.torch import load_file

    for name, t in load_file(str(cached[1] / "model.safetensors")).items():
        assert t.dtype == torch.float32
        assert torch.equal(t, t.to(torch.bfloat16).to(torch.float32)), name
    assert sum(t.abs().sum() for t in load_file(str(cached[1] / "model.safetensors")).values()) > 0


def test_cache_is_reused_not_rebuilt(cached, tmp_path, monkeypatch):
    root, first, _ = cached
    monkeypatch.setenv("SPECULATORS_CACHE", str(root))

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(d, "build_default_verifier", boom)
    assert d.default_verifier(SMALL) == first
    out = d.copy_default_verifier(tmp_path / "copy", SMALL, progress=lambda s: None)
    assert d.dir_hash(out) == d.dir_hash(first)
    assert not list((root / "verifiers").glob(".*tmp*"))
    # another recipe is another cache entry
    import dataclasses

    assert dataclasses.replace(SMALL, seed=1).digest() != SMALL.digest()


def test_default_recipe_fits_vllm_cpu_attention_and_eagle3_layers():
    r = d.DEFAULT_RECIPE
    assert r.hidden_size // r.num_heads >= 32
    assert r.num_layers >= 7
    assert r.digest() != SMALL.digest()


def test_make_tiny_model_refuses_a_non_empty_output(tmp_path, capsys):
    from speculators.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["make-tiny-model", "--output", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert main(["make-tiny-model", "--output", str(tmp_path / "x"), "--num-layers", "4"]) == 2


@pytest.mark.parametrize("argv", [["--hidden-size", "32"]])
def test_make_tiny_model_custom_shapes_still_work(tmp_path, argv):
    from transformers import AutoConfig

    from speculators.cli import main

    assert main(["make-tiny-model", "--output", str(tmp_path / "m"), "--pretrain-steps", "0", *argv]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "m").hidden_size == 32


@pytest.mark.slow
def test_default_verifier_replies_are_varied_and_its_card_says_so():
    """The built default verifier (cached per machine; the regen tests build it too): greedy
    replies to held-out prompts are not a loop of a few tokens (the first recipe: 10.6 distinct
    tokens per 64, held-out perplexity 71.8; this one measured 28.1 and 34.8)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = d.default_verifier()
    card = json.loads((path / d.CARD).read_text())
    assert card["recipe_hash"] == d.DEFAULT_RECIPE.digest()
    assert card["quality"]["distinct_tokens_per_reply"] >= 20 and card["quality"]["heldout_perplexity"] <= 50
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    from speculators.tiny.builders import chat_token_stream

    _, used = chat_token_stream(tok, d.DEFAULT_RECIPE.corpus_tokens, limit=20000, prose=True)
    distinct = []
    for messages in d.heldout_conversations(d.DEFAULT_RECIPE, skip_records=used)[:6]:
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt[-256:]]), max_new_tokens=64, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        distinct.append(len(set(out[0, len(prompt[-256:]):].tolist())))
    assert sum(distinct) / len(distinct) >= 20, distinct


def test_the_package_ships_the_default_recipe_build():
    """A changed recipe must be rebuilt and shipped again (`python -m speculators.tiny.default
    speculators/tiny/default_verifier`), or every machine would build its own bytes."""
    shipped = d.shipped_build(d.DEFAULT_RECIPE)
    assert shipped == d.SHIPPED, "speculators/tiny/default_verifier holds another recipe's build"
    card = json.loads((shipped / d.CARD).read_text())
    assert card["recipe"] == json.loads(json.dumps(d.asdict(d.DEFAULT_RECIPE)))
    assert d.shipped_build(SMALL) is None


def test_an_empty_cache_gets_the_packaged_bytes_without_building(tmp_path, monkeypatch):
    """Every machine uses the same bytes (a build on another CPU's kernels differs; see the
    module docstring), copied so nothing written to the cache reaches the package."""
    monkeypatch.setenv("SPECULATORS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPECULATORS_VERIFIER_FROM_RECIPE", raising=False)

    def boom(*a, **k):
        raise AssertionError("built although the package ships this recipe")

    monkeypatch.setattr(d, "build_default_verifier", boom)
    lines: list[str] = []
    path = d.default_verifier(progress=lines.append)
    assert path == tmp_path / "cache" / "verifiers" / d.DEFAULT_RECIPE.digest()
    assert d.dir_hash(path) == d.dir_hash(d.SHIPPED)
    assert "packaged build" in lines[0]
    # asked to build from the recipe instead, it does
    monkeypatch.setenv("SPECULATORS_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("SPECULATORS_VERIFIER_FROM_RECIPE", "1")
    with pytest.raises(AssertionError, match="built although"):
        d.default_verifier()
