"""--data resolution and raw record readers (no tokenizer needed)."""

from __future__ import annotations

import json

import pytest

from speculators.data.sources import iter_records, resolve_data
from speculators.errors import UserError


def test_resolve_builtin_and_hub_ids(tmp_path):
    assert resolve_data("sharegpt").kind == "sharegpt"
    uc = resolve_data("ultrachat")
    assert (uc.kind, uc.hub_id, uc.split) == ("hub", "HuggingFaceH4/ultrachat_200k", "train_sft")
    hub = resolve_data("org/name:test")
    assert (hub.hub_id, hub.split) == ("org/name", "test")
    assert resolve_data("org/name").split == "train"
    with pytest.raises(UserError, match="file not found"):
        resolve_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="expected 'sharegpt'"):
        resolve_data("not-a-thing")


def test_json_list_and_jsonl(tmp_path):
    rec = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "a.json").write_text(json.dumps([rec, rec]))
    assert len(list(iter_records(resolve_data(str(tmp_path / "a.json"))))) == 2
    (tmp_path / "b.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="list of conversation records"):
        list(iter_records(resolve_data(str(tmp_path / "b.json"))))
    (tmp_path / "c.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n{bad\n")
    with pytest.raises(UserError, match=r"c.jsonl: line 3 is not valid JSON"):
        list(iter_records(resolve_data(str(tmp_path / "c.jsonl"))))


def test_data_fingerprint_tracks_file_changes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n")
    before = resolve_data(str(path)).fingerprint()
    path.write_text("{}\n{}\n")
    assert resolve_data(str(path)).fingerprint() != before


def test_sharegpt_source_stops_cleanly():
    first = next(iter_records(resolve_data("sharegpt")))
    assert isinstance(first.get("conversations"), list)


def test_source_options_parse_and_validate(tmp_path):
    path = tmp_path / "a,b.jsonl"  # a comma inside the path is not an option
    path.write_text("{}\n")
    spec = resolve_data(f"{path},max=5,weight=2.5")
    assert (spec.kind, spec.path, spec.max_samples, spec.weight) == ("jsonl", str(path), 5, 2.5)
    assert resolve_data("ultrachat,max=3").split == "train_sft"
    for bad, why in [(f"{path},max=0", "max must be a positive"), (f"{path},weight=-1", "weight must be"),
                     (f"{path},max=2,colour=red", "unknown option"), (f"{path},max=1,max=2", "given twice")]:
        with pytest.raises(UserError, match=why):
            resolve_data(bad)


def test_ultrachat_layouts_from_local_files(tmp_path):
    """UltraChat as published: ultrachat_200k rows (prompt, prompt_id, messages) in a
    downloaded dataset directory of parquet split files, and the original {"id", "data"}."""
    import datasets

    from speculators.data.sources import normalize_record

    row = lambda i: {"prompt": f"q{i}", "prompt_id": f"id{i}",  # noqa: E731
                     "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    repo = tmp_path / "ultrachat_200k"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list([row(i) for i in range(4)]).to_parquet(str(repo / "data" / "train_sft-00000-of-00001.parquet"))
    datasets.Dataset.from_list([row(i) for i in range(10, 12)]).to_parquet(str(repo / "data" / "test_sft-00000-of-00001.parquet"))
    (repo / "README.md").write_text("dataset card")
    with pytest.raises(UserError, match=r"several splits \['test_sft', 'train_sft'\].*split=train_sft"):
        resolve_data(str(repo))
    records = list(iter_records(resolve_data(f"{repo},split=train_sft")))
    assert [normalize_record(r)[1]["content"] for r in records] == ["a0", "a1", "a2", "a3"]
    with pytest.raises(UserError, match="no files of split 'dev'"):
        resolve_data(f"{repo},split=dev")

    saved = tmp_path / "saved"  # a save_to_disk DatasetDict: train_sft is the default split
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list([row(1)]),
                          "test_sft": datasets.Dataset.from_list([row(2)])}).save_to_disk(str(saved))
    assert [r["prompt_id"] for r in iter_records(resolve_data(str(saved)))] == ["id1"]
    assert [r["prompt_id"] for r in iter_records(resolve_data(f"{saved},split=test_sft"))] == ["id2"]

    original = {"id": "7", "data": ["How are you?", "Fine.", "Sure?", "Yes."]}
    assert [m["role"] for m in normalize_record(original)] == ["user", "assistant", "user", "assistant"]


def test_reasoning_and_tool_records_are_kept():
    from speculators.data.sources import BadConversation, normalize_record, record_tools

    record = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "use the tool",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "21"},
        {"from": "gpt", "value": "21 C", "thinking": "read it"}],
        "tools": '[{"type": "function", "function": {"name": "w"}}]'}
    msgs = normalize_record(record)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}},
                                      "id": "c1"}]
    assert msgs[1]["reasoning_content"] == msgs[1]["thinking"] == "use the tool" and msgs[1]["content"] == ""
    assert msgs[2] == {"role": "tool", "content": "21", "tool_call_id": "c1", "name": "w"}
    assert msgs[3]["reasoning_content"] == "read it"
    assert record_tools(record) == [{"type": "function", "function": {"name": "w"}}]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                           "tool_calls": [{"function": {"arguments": "{}"}}]}]}
    with pytest.raises(BadConversation, match="no function name"):
        normalize_record(bad)
