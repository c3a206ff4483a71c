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
