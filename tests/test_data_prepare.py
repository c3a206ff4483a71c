"""prepare-data: exact loss masks on two template styles, truncation, frequencies, bad input, cache."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from speculators.cli import main as cli_main
from speculators.data.chat import encode_conversations, end_of_turn_ids
from speculators.data.prepare import PrepareConfig, load_prepared, prepare_data
from speculators.data.sources import BadConversation, normalize_record
from speculators.errors import UserError
from speculators.tiny.builders import build_tiny_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Say ok"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def toks():
    return {"llama3": build_tiny_tokenizer("llama3"), "chatml": build_tiny_tokenizer("chatml")}


def expected_from_pieces(tok, pieces):
    """Tokenize hand-written template pieces one by one; mask 1 on the pieces flagged 1."""
    ids, mask = [], []
    for text, flag in pieces:
        piece_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        mask += [flag] * len(piece_ids)
    return ids, mask


def llama3_pieces():
    # Rendered by hand from the Llama-3 layout: header, "\n\n", content, <|eot_id|>.
    p = [("<|begin_of_text|>", 0)]
    for m in CONV:
        p.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0))
        flag = int(m["role"] == "assistant")
        p.append((m["content"], flag))
        p.append(("<|eot_id|>", flag))
    return p


def chatml_pieces():
    # ChatML: <|im_start|>role\ncontent<|im_end|>\n ; the trailing "\n" is not generated.
    p = []
    for m in CONV:
        flag = int(m["role"] == "assistant")
        p.append((f"<|im_start|>{m['role']}\n", 0))
        p.append((m["content"], flag))
        p.append(("<|im_end|>", flag))
        p.append(("\n", 0))
    return p


@pytest.mark.parametrize("template,pieces", [("llama3", llama3_pieces), ("chatml", chatml_pieces)])
def test_loss_mask_token_by_token(toks, template, pieces):
    tok = toks[template]
    want_ids, want_mask = expected_from_pieces(tok, pieces())
    [(ids, mask, truncated)] = encode_conversations(tok, [CONV], end_of_turn_ids(tok))
    assert ids == want_ids
    assert ids == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert mask == want_mask
    assert not truncated
    # Both assistant turns are masked, each ending on the end-of-turn token.
    eot = tok.eos_token_id
    assert sum(1 for i, m in zip(ids, mask) if m and i == eot) == 2
    text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert text == "Hello! How can I help?" + tok.eos_token + "ok" + tok.eos_token


# Like Qwen3's template: history assistant turns lose their <think> part, and only the
# final assistant turn (after the last user message) gets an empty think block. A turn
# renders differently depending on what follows it, so prefix-by-prefix rendering fails.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- if loop.index0 > ns.last_user and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_renders_last_turn_differently():
    tok = build_tiny_tokenizer("chatml")
    tok.chat_template = QWEN3_STYLE
    conv = [dict(m) for m in CONV]
    conv[2]["content"] = "<think>\nhmm</think>\n\n" + conv[2]["content"]  # history: think part dropped
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0), ("Hello! How can I help?<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>user\nSay ok<|im_end|>\n", 0),
        # The final turn is prefix-stable: everything after the generation prompt is what the
        # model writes, the (empty) think block included.
        ("<|im_start|>assistant\n", 0), ("<think>\n\n</think>\n\nok<|im_end|>", 1), ("\n", 0),
    ]
    want_ids, want_mask = expected_from_pieces(tok, pieces)
    [(ids, mask, _)] = encode_conversations(tok, [conv], end_of_turn_ids(tok))
    assert ids == want_ids and mask == want_mask
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=False)


def test_llama3_template_trim_is_respected(toks):
    tok = toks["llama3"]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  padded answer \n"}]
    [(ids, mask, _)] = encode_conversations(tok, [conv], end_of_turn_ids(tok))
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "padded answer<|eot_id|>"


def test_truncation_and_dropping(toks):
    tok = toks["chatml"]
    long_user = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "answer"}]
    [(ids, mask, truncated)] = encode_conversations(tok, [CONV], end_of_turn_ids(tok), max_tokens=30)
    full_ids, full_mask, _ = encode_conversations(tok, [CONV], end_of_turn_ids(tok))[0]
    assert truncated and ids == full_ids[:30] and mask == full_mask[:30]
    [(ids2, mask2, truncated2)] = encode_conversations(tok, [long_user], end_of_turn_ids(tok), max_tokens=20)
    assert truncated2 and len(ids2) == 20 and sum(mask2) == 0  # prepare-data drops it


@pytest.mark.parametrize("template", ["llama3", "qwen3_style"])
def test_long_conversation_cut_matches_full_render(template):
    tok = build_tiny_tokenizer("llama3" if template == "llama3" else "chatml")
    if template == "qwen3_style":
        tok.chat_template = QWEN3_STYLE
    conv = []
    for k in range(40):
        conv += [{"role": "user", "content": f"question {k} " * 5}, {"role": "assistant", "content": f"reply {k} " * 7}]
    full = encode_conversations(tok, [conv], end_of_turn_ids(tok))[0]
    cut = encode_conversations(tok, [conv], end_of_turn_ids(tok), max_tokens=50)[0]
    assert cut[0] == full[0][:50] and cut[1] == full[1][:50] and cut[2]


def test_normalize_record_formats():
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                                  {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in normalize_record(sharegpt)] == ["system", "user", "assistant"]
    messages = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    assert normalize_record(messages)[1] == {"role": "assistant", "content": "a"}
    for bad, why in [({"conversations": []}, "empty"), ({"messages": [{"role": "user", "content": "u"}]}, "assistant"),
                     ({"text": "x"}, "neither"), ({"messages": [{"role": "alien", "content": "x"}]}, "role")]:
        with pytest.raises(BadConversation, match=why):
            normalize_record(bad)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"messages": [{"role": "user", "content": "Tell me about cats"},
                  {"role": "assistant", "content": "Cats are small carnivorous mammals."}]},
    {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi, how are you?"},
                       {"from": "human", "value": "fine"}, {"from": "gpt", "value": "great"}]},
    {"conversations": []},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "late"}]},
]


def test_prepare_data_end_to_end(tiny_qwen3, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", RECORDS)
    cfg = PrepareConfig(model=str(tiny_qwen3), data=str(data), output=str(tmp_path / "out"), seq_length=64)
    result = prepare_data(cfg)
    assert result.kept == 2 and not result.cached
    assert result.dropped == {"empty conversation": 1, "no assistant turn": 1,
                              "no assistant tokens after truncation": 1}
    out = tmp_path / "out"
    for name in ("dataset_info.json", "state.json", "token_freq.pt", "prepare_config.json"):
        assert (out / name).is_file()
    ds = load_prepared(out)
    assert ds.column_names == ["input_ids", "loss_mask"] and len(ds) == 2
    freq = torch.load(out / "token_freq.pt", weights_only=True)
    want: Counter = Counter()
    for row in ds:
        assert len(row["input_ids"]) == len(row["loss_mask"]) <= 64
        want.update(i for i, m in zip(row["input_ids"], row["loss_mask"]) if m)
    assert freq == dict(want) and sum(freq.values()) == result.assistant_tokens
    meta = json.loads((out / "prepare_config.json").read_text())
    assert meta["counts"]["kept"] == 2 and meta["counts"]["dropped_total"] == 3
    # Same inputs: cache hit; a different parameter rebuilds.
    assert prepare_data(cfg).cached
    again = prepare_data(PrepareConfig(**{**cfg.__dict__, "seq_length": 32}))
    assert not again.cached and json.loads((out / "prepare_config.json").read_text())["params"]["seq_length"] == 32


def test_max_samples_and_seed(tiny_llama, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(12)]
    data = write_jsonl(tmp_path / "c.jsonl", records)
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_data(PrepareConfig(model=str(tiny_llama), data=str(data), output=str(tmp_path / name),
                                   seq_length=64, max_samples=5, seed=seed))
        outs.append(load_prepared(tmp_path / name)["input_ids"])
    assert len(outs[0]) == 5 and outs[0] == outs[1] and outs[0] != outs[2]


def test_malformed_jsonl_reports_line(tiny_llama, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"messages": [oops\n')
    with pytest.raises(UserError, match=r"line 3"):
        prepare_data(PrepareConfig(model=str(tiny_llama), data=str(path), output=str(tmp_path / "o"), seq_length=32))


def test_missing_chat_template(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "no_template"
    shutil.copytree(tiny_llama, model)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS[:1])
    with pytest.raises(UserError, match="no chat template"):
        prepare_data(PrepareConfig(model=str(model), data=str(data), output=str(tmp_path / "o"), seq_length=32))


def test_all_empty_conversations_is_an_error(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "e.jsonl", [{"conversations": []}, {"messages": []}])
    with pytest.raises(UserError, match="no usable conversations"):
        prepare_data(PrepareConfig(model=str(tiny_llama), data=str(data), output=str(tmp_path / "o"), seq_length=32))


def test_refuses_foreign_output_dir(tiny_llama, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("x")
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS[:1])
    with pytest.raises(UserError, match="non-empty"):
        prepare_data(PrepareConfig(model=str(tiny_llama), data=str(data), output=str(tmp_path / "o"), seq_length=32))


def test_cli_sharegpt_builtin_offline(tiny_llama, tmp_path, capsys):
    rc = cli_main(["prepare-data", "--model", str(tiny_llama), "--data", "sharegpt",
                   "--output", str(tmp_path / "sg"), "--max-samples", "20", "--seq-length", "128"])
    assert rc == 0
    assert "20 samples" in capsys.readouterr().out
    ds = load_prepared(tmp_path / "sg")
    assert len(ds) == 20 and all(sum(m) > 0 for m in ds["loss_mask"])


def test_cli_ultrachat_offline_is_a_clear_error(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = cli_main(["prepare-data", "--model", str(tiny_llama), "--data", "ultrachat",
                   "--output", str(tmp_path / "u"), "--seq-length", "64"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "HuggingFaceH4/ultrachat_200k" in err and "train_sft" in err


def test_several_sources_with_limits_and_weights(tiny_llama, tmp_path, capsys):
    def convs(tag):
        return [{"messages": [{"role": "user", "content": f"question {i}"},
                              {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(10)]

    a = write_jsonl(tmp_path / "alpha.jsonl", convs("alpha"))
    b = write_jsonl(tmp_path / "beta.jsonl", convs("beta"))
    tok = load_tokenizer_for(tiny_llama)

    def origins(out):
        texts = [tok.decode(ids) for ids in load_prepared(out)["input_ids"]]
        return Counter("alpha" if "alpha" in t else "beta" for t in texts)

    assert cli_main(["prepare-data", "--model", str(tiny_llama), "--data", f"{a},max=3", "--data", str(b),
                     "--output", str(tmp_path / "m"), "--seq-length", "64"]) == 0
    assert origins(tmp_path / "m") == {"alpha": 3, "beta": 10}
    meta = json.loads((tmp_path / "m" / "prepare_config.json").read_text())
    assert [(s["name"], s["max"], s["kept"]) for s in meta["sources"]] == [(f"{a},max=3", 3, 3), (str(b), None, 10)]
    assert meta["params"]["data"] == [f"{a},max=3", str(b)]

    prepare_data(PrepareConfig(model=str(tiny_llama), data=[f"{a},weight=3", f"{b},weight=1"],
                               output=str(tmp_path / "w"), seq_length=64, max_samples=8))
    assert origins(tmp_path / "w") == {"alpha": 6, "beta": 2}
    rows = load_prepared(tmp_path / "w")["input_ids"]
    assert [("alpha" in tok.decode(r)) for r in rows] != sorted(("alpha" in tok.decode(r)) for r in rows)  # interleaved
    with pytest.raises(UserError, match="give --max-samples"):
        prepare_data(PrepareConfig(model=str(tiny_llama), data=[f"{a},weight=3", str(b)], output=str(tmp_path / "x"),
                                   seq_length=64))


def load_tokenizer_for(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def test_opening_assistant_turn_dropped_or_kept_as_context(tiny_qwen3, tmp_path):
    records = [{"messages": [{"role": "assistant", "content": "Welcome back!"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}]}]
    data = write_jsonl(tmp_path / "o.jsonl", records)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    texts = {}
    for name, kw in [("default", {}), ("context", {"opening_assistant": "context"}),
                     ("turn", {"rows": "per-turn"}), ("turn_drop", {"rows": "per-turn", "opening_assistant": "drop"})]:
        prepare_data(PrepareConfig(model=str(tiny_qwen3), data=str(data), output=str(tmp_path / name), seq_length=64, **kw))
        row = load_prepared(tmp_path / name)[0]
        texts[name] = (tok.decode(row["input_ids"]), tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]))
        assert json.loads((tmp_path / name / "prepare_config.json").read_text())["params"]["opening_assistant"] == \
            kw.get("opening_assistant", "context" if kw.get("rows") == "per-turn" else "drop")
    assert "Welcome back!" not in texts["default"][0] and "Welcome back!" not in texts["turn_drop"][0]
    for name in ("context", "turn"):
        assert "Welcome back!" in texts[name][0] and "Welcome back!" not in texts[name][1]
    assert all(t[1].startswith("hello") for t in texts.values())
