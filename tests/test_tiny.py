"""The tiny fixtures behave like real verifiers: templates render, models load."""

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speculators.data.sharegpt import iter_json_array, iter_sharegpt


def test_iter_json_array_handles_every_chunk_edge():
    data = [{"a": i, "b": "xé中" * i} for i in range(30)] + [1, 2.5, "s", [1, 2], True, None, -1.5e3]
    raw = json.dumps(data, ensure_ascii=False).encode()
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        assert list(iter_json_array(io.BytesIO(raw), chunk)) == data
    assert list(iter_json_array(io.BytesIO(b" [ ] "))) == []
    cut = iter_json_array(io.BytesIO(raw[: len(raw) // 2]), 64)
    with pytest.raises(ValueError, match="unterminated"):
        list(cut)


def test_sharegpt_stops_with_a_warning_at_the_packaged_file_end(caplog):
    """The packaged file ends mid-record after 17,671 conversations: all of them, then a warning."""
    assert sum(1 for _ in iter_sharegpt()) == 17671
    assert "stopped after 17671 complete records" in caplog.text


def test_sharegpt_streams_real_records():
    records = list(iter_sharegpt(limit=5))
    assert len(records) == 5
    assert all("conversations" in r for r in records)
    assert records[0]["conversations"][0]["from"] == "human"


def test_tiny_verifiers_load_and_render(tiny_llama, tiny_qwen3):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for path, marker in ((tiny_llama, "<|eot_id|>"), (tiny_qwen3, "<|im_end|>")):
        tok = AutoTokenizer.from_pretrained(path)
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert marker in text and "Hello!" in text
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.num_hidden_layers == 8
        ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=False)])
        out = model(input_ids=ids, output_hidden_states=True)
        assert out.logits.shape == (1, ids.shape[1], len(tok))
        assert len(out.hidden_states) == 9


def test_sharegpt_stream_stops_cleanly_at_truncated_end(monkeypatch, caplog):
    import speculators.data.sharegpt as sg

    raw = b'[{"id": "a", "conversations": []}, {"id": "b", "conversations": [{"from": "hu'
    monkeypatch.setattr(sg, "_open_sharegpt", lambda: io.BytesIO(raw))
    with caplog.at_level("WARNING"):
        records = list(sg.iter_sharegpt())
    assert [r["id"] for r in records] == ["a"]
    assert "stopped after 1 complete records" in caplog.text
