"""One reader of the verifier's config and one hidden-state capture, checked against a direct
transformers forward with `output_hidden_states=True`, through every stage that uses them."""

from __future__ import annotations

import pytest
import torch

from speculators.errors import UserError
from speculators.verifier import capture_hidden_states, read_verifier_config


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(llama):
    """Direct forward: transformers' hidden_states (id n there is after the final norm)."""
    ids = torch.randint(3, llama.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = llama(ids, output_hidden_states=True)
    return ids, out


def check_against_reference(llama, states: list[torch.Tensor], layer_ids: list[int], expected: tuple, atol=0.0):
    n = llama.config.num_hidden_layers
    assert len(expected) == n + 1
    for i, h in zip(layer_ids, states):
        want = expected[i]
        if i == n:  # pre-norm: applying the verifier's own final norm gives transformers' last state
            h = llama.model.norm(h.float())
        torch.testing.assert_close(h.float(), want.float(), atol=atol, rtol=0 if atol == 0 else 1e-2,
                                   msg=lambda m, i=i: f"layer id {i}: {m}")


def test_capture_matches_output_hidden_states(llama, reference):
    ids, out = reference
    n = llama.config.num_hidden_layers
    every = list(range(n + 1))
    with torch.no_grad(), capture_hidden_states(llama, every) as capture:
        llama(ids)
    check_against_reference(llama, capture.ordered(), every, out.hidden_states)
    # id n is the norm's INPUT: it differs from transformers' (post-norm) hidden_states[n]
    assert not torch.allclose(capture.states[n], out.hidden_states[n])
    with pytest.raises(UserError, match="outside"):
        with capture_hidden_states(llama, [n + 1]):
            pass


def test_datagen_transformers_backend_uses_the_capture(llama, reference):
    from speculators.datagen.transformers_backend import TransformersGenerator

    ids, out = reference
    n = llama.config.num_hidden_layers
    layer_ids = [1, 4, 5, n]
    gen = TransformersGenerator(llama, layer_ids, torch.device("cpu"))
    short = ids[1, :7].tolist()  # right-padded inside the batch
    got = gen.generate([ids[0].tolist(), short])
    check_against_reference(llama, got[0], layer_ids, tuple(h[0] for h in out.hidden_states), atol=1e-5)
    with torch.no_grad():
        alone = llama(torch.tensor([short]), output_hidden_states=True).hidden_states
    check_against_reference(llama, got[1], layer_ids, tuple(h[0] for h in alone), atol=1e-5)


def test_eval_verifier_uses_the_capture(llama, reference):
    from speculators.evaluate.verifier import capture_layers

    ids, out = reference
    n = llama.config.num_hidden_layers
    layer_ids = [2, 4, n]
    one = ids[:1]
    logits, states = capture_layers(llama, layer_ids, one)
    # the reference over the same one-row batch: CPU matmul kernels may block a 2-row batch
    # differently, so rows of a larger batch can differ in the last bit
    with torch.no_grad():
        out = llama(one, output_hidden_states=True)
    check_against_reference(llama, states, layer_ids, tuple(h[0] for h in out.hidden_states))
    torch.testing.assert_close(logits, out.logits[0])


def test_synthetic_training_data_uses_the_capture(tiny_llama, llama, tmp_path):
    from speculators.data.formats import open_sample_store
    from tests.support.synthetic import write_synthetic_hidden_states

    n = llama.config.num_hidden_layers
    layer_ids = [0, 3, 6, n]
    out = write_synthetic_hidden_states(tiny_llama, tmp_path / "hs", num_samples=2, seq_len=10, layer_ids=layer_ids)
    store = open_sample_store(str(out))
    sample = store.load(1)
    with torch.no_grad():
        ref = llama(sample["input_ids"][None], output_hidden_states=True).hidden_states
    # stored as bf16: compare with the reference rounded the same way
    for i, h in zip(layer_ids, sample["hidden_states"]):
        want = ref[i][0]
        if i == n:
            h = llama.model.norm(h.float()).to(torch.bfloat16)
            want = want.to(torch.bfloat16)
            torch.testing.assert_close(h.float(), want.float(), atol=0.05, rtol=0.02)
        else:
            assert torch.equal(h, want.to(torch.bfloat16)), i


def test_one_config_reader_for_multimodal_wrappers(tmp_path):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=300)
    LlavaConfig(text_config=text).save_pretrained(tmp_path / "mm")
    got = read_verifier_config(str(tmp_path / "mm"))
    assert (got.num_hidden_layers, got.hidden_size, got.vocab_size) == (5, 64, 300)

    from speculators.data.vocab import model_vocab_size
    from speculators.datagen.runner import read_model_shape
    from speculators.layers import text_config_of

    assert read_model_shape(str(tmp_path / "mm")) == (5, 64)
    assert model_vocab_size(str(tmp_path / "mm")) == 300
    assert text_config_of(str(tmp_path / "mm")).num_hidden_layers == 5
    from speculators.models.eagle3 import Eagle3Config

    draft = Eagle3Config.from_verifier_config(LlavaConfig(text_config=text), draft_vocab_size=100)
    assert (draft.hidden_size, draft.vocab_size) == (64, 300)
    with pytest.raises(UserError, match="--target-model-path .*cannot load its config"):
        read_model_shape(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--verifier-name-or-path"):
        read_verifier_config(str(tmp_path / "missing"))
