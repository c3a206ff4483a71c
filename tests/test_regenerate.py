"""`speculators regenerate`: verifier-written assistant turns, resumable, fed to prepare-data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speculators.cli import main as cli_main

CONVS = [
    # multi-turn: the second reply must follow the *regenerated* first reply
    {"id": "a", "conversations": [
        {"from": "human", "value": "Tell me about rivers."},
        {"from": "gpt", "value": "Rivers flow to the sea."},
        {"from": "human", "value": "And lakes?"},
        {"from": "gpt", "value": "Lakes are still."},
    ]},
    {"id": "b", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]},
    {"id": "bad1", "conversations": [{"from": "human", "value": "no answer here"}]},
    {"id": "bad2", "conversations": [{"from": "alien", "value": "?"}]},
    {"id": "c", "conversations": [
        {"from": "gpt", "value": "an opening assistant turn has no prompt"},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "a trailing user turn nobody answers"},
    ]},
    {"id": "d", "conversations": [
        {"from": "human", "value": "Write a haiku."},
        {"from": "gpt", "value": "Old pond, frog jumps in."},
    ]},
]


@pytest.fixture()
def source(tmp_path):
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVS))
    return path


def _run(model, source, out, *extra):
    return cli_main(["regenerate", "--model", str(model), "--data", str(source), "--output", str(out),
                     "--max-tokens", "12", "--seed", "0", *extra])


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _greedy(model, tok, messages, max_tokens):
    """Reference: one unpadded transformers generate on the chat-templated history."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    row = out[0, len(ids):].tolist()
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id) + 1]
    return tok.decode(row, skip_special_tokens=True)


def test_each_turn_is_the_verifiers_greedy_reply_to_the_regenerated_history(tiny_llama, source, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _run(tiny_llama, source, out, "--concurrency", "3") == 0
    summary = capsys.readouterr().out
    records = {r["id"].split(":")[-1]: r for r in _lines(out)}
    assert set(records) == {"a", "b", "c", "d"}
    # bad records are skipped and counted with their reason, never silently
    assert "skipped 2 records" in summary and "unknown role 'alien'" in summary and "no assistant turn" in summary
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    originals = {r["id"]: r for r in CONVS}
    for rid, rec in records.items():
        conv = rec["conversations"]
        assert conv[-1]["role"] == "assistant"
        src = originals[rid].get("conversations") or originals[rid]["messages"]
        src_user = [t.get("value", t.get("content")) for t in src if t.get("from", t.get("role")) in ("human", "user")]
        out_user = [m["content"] for m in conv if m["role"] == "user"]
        assert out_user == src_user[: len(out_user)]  # user turns verbatim
        for k, m in enumerate(conv):
            if m["role"] == "assistant":
                assert m["content"] == _greedy(model, tok, conv[:k], 12), (rid, k)
    assert [m["role"] for m in records["a"]["conversations"]] == ["user", "assistant", "user", "assistant"]
    assert records["b"]["conversations"][0] == {"role": "system", "content": "Be brief."}
    # the opening assistant turn and the unanswered trailing user turn are gone
    assert [m["role"] for m in records["c"]["conversations"]] == ["user", "assistant"]
    assert records["a"]["regenerated"]["backend"] == "transformers"


def test_resume_after_a_crash_skips_done_records_and_cuts_a_torn_line(tiny_llama, source, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert _run(tiny_llama, source, full, "--concurrency", "1") == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:2]) + lines[2][:17])  # killed while writing the third record
    capsys.readouterr()
    assert _run(tiny_llama, source, crashed, "--concurrency", "1") == 0
    text = capsys.readouterr().out
    assert "2 records written" in text and "2 records were already there" in text
    assert crashed.read_text() == full.read_text()
    # a third run has nothing to do and changes nothing
    assert _run(tiny_llama, source, crashed) == 0
    assert crashed.read_text() == full.read_text()
    # other settings would mix two runs in one file: refused, file untouched
    capsys.readouterr()
    assert _run(tiny_llama, source, crashed, "--temperature", "0.7") == 2
    assert "other settings" in capsys.readouterr().err
    assert crashed.read_text() == full.read_text()


def test_output_not_written_by_regenerate_is_refused(tiny_llama, source, tmp_path, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text("my precious notes\n")
    assert _run(tiny_llama, source, out) == 2
    assert "not written by regenerate" in capsys.readouterr().err
    assert out.read_text() == "my precious notes\n"


def test_prepare_data_takes_the_output_unchanged(tiny_llama, source, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "out.jsonl"
    assert _run(tiny_llama, source, out, "--max-samples", "3") == 0
    records = _lines(out)
    assert len(records) == 3
    prepared = tmp_path / "prepared"
    assert cli_main(["prepare-data", "--model", str(tiny_llama), "--data", str(out), "--output", str(prepared),
                     "--seq-length", "512"]) == 0
    ds = load_from_disk(str(prepared))
    assert len(ds) == 3
    # the run's record says the responses were regenerated, and how
    meta = json.loads((prepared / "prepare_config.json").read_text())
    assert meta["regenerated"] == records[0]["regenerated"]
    assert meta["regenerated"]["backend"] == "transformers" and meta["regenerated"]["max_tokens"] == 12
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [tok.decode(row["input_ids"]) for row in ds]
    for rec in records:
        reply = rec["conversations"][-1]["content"].strip()
        assert any(reply in t for t in texts)


def test_alias_and_bad_flags(tiny_llama, source, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert cli_main(["regenerate-responses", "--model", str(tiny_llama), "--data", str(source), "--output",
                     str(out), "--max-tokens", "0"]) == 2
    assert "--max-tokens must be a whole number between 1 and 1048576 (got 0)" in capsys.readouterr().err
    assert cli_main(["regenerate", "--model", str(tiny_llama), "--data", str(source), "--output", str(out),
                     "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "--backend vllm" in capsys.readouterr().err
    assert cli_main(["regenerate", "--model", str(tiny_llama), "--data", str(tmp_path / "missing.jsonl"),
                     "--output", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""


def test_long_prompts_end_the_conversation_with_a_counted_reason(tiny_llama, source, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    first = tok.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}], tokenize=True,
                                    add_generation_prompt=True, return_dict=False)
    out = tmp_path / "out.jsonl"
    # room for record a's first prompt, not for its second (which holds the first reply)
    assert _run(tiny_llama, source, out, "--max-prompt-tokens", str(len(first))) == 0
    text = capsys.readouterr().out
    recs = {r["id"].split(":")[-1]: r for r in _lines(out)}
    assert [m["role"] for m in recs["a"]["conversations"]] == ["user", "assistant"]
    assert "prompt longer than --max-prompt-tokens" in text


@pytest.mark.slow
def test_vllm_backend_starts_a_server_and_agrees_with_transformers(tmp_path, capsys):
    """Real vLLM (CPU build here): regenerate starts `vllm serve`, and its greedy replies
    equal the transformers backend's, every one (same verifier: the default one, head_dim 32):
    vLLM's chat path renders and tokenizes the prompt as our template does, and the server
    computes in float32 as the transformers backend does on the CPU (with vLLM's own bf16
    default some replies differed)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment")
    from speculators.tiny.default import default_verifier

    model = default_verifier()
    common = ["--model", str(model), "--data", "sharegpt", "--max-samples", "8", "--max-tokens", "24",
              "--max-turns", "1", "--max-prompt-tokens", "192", "--seed", "0"]
    assert cli_main(["regenerate", *common, "--output", str(tmp_path / "hf.jsonl")]) == 0
    assert cli_main(["regenerate", *common, "--backend", "vllm", "--output", str(tmp_path / "vllm.jsonl"),
                     "--", "--max-model-len", "1024"]) == 0
    hf = {r["id"]: r for r in _lines(tmp_path / "hf.jsonl")}
    vl = {r["id"]: r for r in _lines(tmp_path / "vllm.jsonl")}
    assert set(hf) == set(vl) and len(hf) >= 4
    assert all(r["regenerated"]["backend"] == "vllm" for r in vl.values())
    same = sum(hf[i]["conversations"][-1]["content"].strip() == vl[i]["conversations"][-1]["content"].strip()
               for i in hf)
    assert same == len(hf), (same, len(hf))


def test_progress_lines_and_the_stage_bar_both_keep_going_on_a_long_run(tiny_llama, source, tmp_path, capsys,
                                                                        monkeypatch):
    """A run long enough for the people's progress line (every 2 s) to be printed between chunks
    still feeds the dashboard's bar after it (the two once shared a variable name, and the chunk
    after the first printed line crashed). The runner's clock is made to advance 3 s a call."""
    import itertools
    import types

    from speculators.regenerate import runner

    ticks = itertools.count(0.0, 3.0)
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(time=lambda: next(ticks)))
    progress = tmp_path / "regen.progress.jsonl"
    monkeypatch.setenv("SPECULATORS_PROGRESS_FILE", str(progress))
    out = tmp_path / "out.jsonl"
    # with a known total (as the demo and the dashboard's runs have) both the bar and the line run
    assert _run(tiny_llama, source, out, "--concurrency", "1", "--max-samples", str(len(CONVS))) == 0
    text = capsys.readouterr().out
    assert text.count("regenerate: [") >= 2, text  # printed between chunks, more than once
    last = json.loads(progress.read_text().splitlines()[-1])
    assert last["done"] == last["total"] == len(CONVS)
    assert len(_lines(out)) == 4
