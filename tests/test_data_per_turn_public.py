"""`prepare-data --rows per-turn` against the public speculators package's own preprocessing.

The public side runs in its venv (fixture `public_speculators_python`) on the same
tokenizer and records: with --train-after-end-of-turn our rows equal its rows token for
token (ids and masks); by default they differ only in tokens after the end-of-turn token.
"""

from __future__ import annotations

import json

import pytest

from speculators.data.prepare import PrepareConfig, load_prepared, prepare_data
from speculators.tiny.families import family_tokenizer

from tests.support.chat_families import AGENT_CONV, TOOLS
from tests.support.public_pkg import run_public

PLAIN = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another"},
     {"role": "assistant", "content": "Green, like grass in spring."}],
    # An opening assistant turn: context for the later turns, never a row of its own.
    [{"role": "assistant", "content": "Hi, I am a bot."}, {"role": "user", "content": "Tell me a fact about cats"},
     {"role": "assistant", "content": "Cats sleep for most of the day."}],
    [{"role": "user", "content": "What is 2+2? Think first."},
     {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."}],
    [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "A long prompt."}],
]


def _records(family: str) -> list[dict]:
    out = [{"messages": conv} for conv in PLAIN]
    if family != "harmony":  # the public normaliser drops a tool message's name, which harmony renders
        agent = [{k: v for k, v in m.items() if k != "thinking"} for m in AGENT_CONV]
        out.append({"messages": agent, "tools": TOOLS})
    return out


def _rows(ds) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return sorted((tuple(ids), tuple(mask)) for ids, mask in zip(ds["input_ids"], ds["loss_mask"]))


FAMILIES = ["llama3", "qwen3", "harmony"]
SMALL = {"llama3": 48, "qwen3": 48, "harmony": 96}  # harmony's system message alone is ~50 tokens


@pytest.fixture(scope="module")
def public_rows(public_speculators_python, tmp_path_factory):
    """The public preprocessing's rows for every family, in one run of its venv."""
    root = tmp_path_factory.mktemp("per_turn_public")
    jobs = []
    for family in FAMILIES:
        d = root / family
        d.mkdir()
        family_tokenizer(family).save_pretrained(d / "tok")
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(family)))
        jobs.append({"tokenizer": str(d / "tok"), "records": str(d / "records.jsonl"), "out": str(d / "public.json"),
                     "lengths": [4096, SMALL[family]]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    run_public(public_speculators_python, "per_turn_rows.py", root / "jobs.json")
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_per_turn_matches_public_preprocessing(family, public_rows, tmp_path):
    tok = family_tokenizer(family)
    model, records = public_rows / family / "tok", public_rows / family / "records.jsonl"
    by_length = json.loads((public_rows / family / "public.json").read_text())
    small = SMALL[family]
    for seq_length in (4096, small):
        theirs = by_length[str(seq_length)]
        assert theirs["input_ids"], "the public preprocessing made no rows"
        theirs_rows = _rows(theirs)
        assert theirs["seq_len"] == [len(x) for x in theirs["input_ids"]]

        same = tmp_path / f"ours_public_{seq_length}"
        prepare_data(PrepareConfig(model=str(model), data=str(records), output=str(same), seq_length=seq_length,
                                   rows="per-turn", train_after_end_of_turn=True))
        assert _rows(load_prepared(same)) == theirs_rows

        default = tmp_path / f"ours_{seq_length}"
        prepare_data(PrepareConfig(model=str(model), data=str(records), output=str(default), seq_length=seq_length,
                                   rows="per-turn"))
        ours_rows = _rows(load_prepared(default))
        assert [ids for ids, _ in ours_rows] == [ids for ids, _ in theirs_rows]
        eot = {tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>", "<|return|>", "<|call|>")}
        for (ids, ours), (_, mask) in zip(ours_rows, theirs_rows):
            for i, (a, b) in enumerate(zip(ours, mask)):
                if a != b:  # only the tokens after the row's last end-of-turn token differ
                    assert (a, b) == (0, 1) and any(t in eot for t in ids[:i])
        if seq_length == 4096:
            n_turns = sum(1 for r in _records(family) for j, m in enumerate(r["messages"]) if m["role"] == "assistant" and j)
            assert len(theirs_rows) == n_turns
