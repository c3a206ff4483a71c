"""The typed metrics.jsonl records: what is written reads back as the same record, a line a
reader cannot trust reads as None, and non-finite floats are written as null."""

from __future__ import annotations

import json
import math

import pytest

from speculators.metric_records import (
    AcceptanceRecord,
    CheckpointRecord,
    EndRecord,
    ProgressRecord,
    StartRecord,
    StepCheckpointRecord,
    TrainRecord,
    ValRecord,
    parse_line,
    parse_record,
)

RECORDS = [
    StartRecord(run_name="r", run_id="abc", total_steps=10, epochs=2, steps_per_epoch=5, ts=1.5),
    StartRecord(run_name="r", run_id=None, total_steps=10, epochs=2, steps_per_epoch=5, resumed_from="0-step2",
                resumed_step=2, ts=2.0),
    TrainRecord(epoch=0, step=3, total_steps=10, metrics={"loss": 1.25, "lr": 1e-4, "full_acc_0": 0.5}, ts=3.0),
    ValRecord(epoch=1, step=10, metrics={"loss": 0.75, "step_acc_1": 0.25}, ts=4.0),
    CheckpointRecord(epoch=1, step=10, path="/s/1", val_loss=0.75, is_best=True, ts=5.0),
    CheckpointRecord(epoch=0, step=5, path="/s/0", val_loss=None, is_best=False, ts=5.5),
    StepCheckpointRecord(epoch=0, step=2, path="/s/0-step2", reason="SIGTERM", ts=6.0),
    EndRecord(status="completed", ts=7.0),
    EndRecord(status="interrupted", signal="SIGINT", ts=8.0),
    ProgressRecord(done=3, total=7, ts=9.0),
    CheckpointRecord(epoch=0, step=5, path="/s/0", val_loss=0.5, is_best=True, best_by="acceptance", score=1.75,
                     ts=5.6),
    AcceptanceRecord(epoch=0, step=4, mean_acceptance_length=1.75, acceptance_rate_per_position=[0.5, 0.25],
                     prompts=8, tokens=256, seconds=0.5, ts=5.7),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(record):
    line = record.to_json()
    assert parse_line(line) == record
    obj = json.loads(line)
    assert obj["type"] == record.TYPE and obj["ts"] == record.ts


def test_line_layout_is_the_one_readers_know():
    """The keys of each line, in order (what the run store and dashboard read)."""
    assert list(json.loads(RECORDS[2].to_json())) == ["type", "ts", "epoch", "step", "total_steps", "metrics"]
    assert list(json.loads(RECORDS[0].to_json())) == ["type", "ts", "run_name", "run_id", "total_steps", "epochs",
                                                      "steps_per_epoch", "resumed_from", "resumed_step"]
    assert json.loads(EndRecord(status="completed", ts=1.0).to_json()) == {"type": "end", "ts": 1.0,
                                                                           "status": "completed"}
    assert json.loads(RECORDS[8].to_json())["signal"] == "SIGINT"


def test_non_finite_floats_are_written_as_null():
    record = TrainRecord(epoch=0, step=1, total_steps=2, metrics={"loss": math.nan, "lr": math.inf, "x": -math.inf,
                                                                 "ok": 0.5})
    line = record.to_json()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["metrics"] == {"loss": None, "lr": None, "x": None, "ok": 0.5}
    back = parse_line(line)
    assert isinstance(back, TrainRecord) and back.metrics["loss"] is None and back.metrics["ok"] == 0.5
    assert json.loads(CheckpointRecord(epoch=0, step=1, path="p", val_loss=math.nan, is_best=False).to_json())[
        "val_loss"] is None


@pytest.mark.parametrize("line", [
    '{"type": "train", "ts": 1, "epoch": 0, "st',                                   # half-written (killed run)
    "not json at all",
    "[1, 2]",                                                                      # JSON, not an object
    '{"type": "nonsense", "ts": 1}',                                                # unknown type
    '{"ts": 1, "epoch": 0, "step": 1, "total_steps": 2, "metrics": {}}',            # no type
    '{"type": "train", "ts": 1, "epoch": 0, "total_steps": 2, "metrics": {}}',      # required field missing
    '{"type": "train", "ts": 1, "epoch": 0, "step": "3", "total_steps": 2, "metrics": {}}',   # step a string
    '{"type": "train", "ts": 1, "epoch": 0, "step": true, "total_steps": 2, "metrics": {}}',  # step a bool
    '{"type": "train", "ts": 1, "epoch": 0, "step": 3, "total_steps": 2, "metrics": null}',   # metrics not a dict
    '{"type": "checkpoint", "ts": 1, "epoch": 0, "step": 3, "path": "p", "val_loss": 1.0, "is_best": "yes"}',
    '{"type": "end", "ts": 1}',                                                     # no status
    '{"type": "acceptance", "ts": 1, "epoch": 0, "step": 2, "mean_acceptance_length": 1.5, '
    '"acceptance_rate_per_position": [0.5, "x"], "prompts": 1, "tokens": 8, "seconds": 0.1}',  # a rate not a number
    '{"type": "acceptance", "ts": 1, "epoch": 0, "step": 2, "mean_acceptance_length": 1.5, '
    '"acceptance_rate_per_position": 0.5, "prompts": 1, "tokens": 8, "seconds": 0.1}',         # rates not a list
])
def test_malformed_lines_give_none(line):
    assert parse_line(line) is None


def test_missing_optional_fields_take_their_defaults():
    rec = parse_record({"type": "end", "status": "completed"})
    assert rec == EndRecord(status="completed", signal=None, ts=0.0)  # no ts: 0.0, a reader's "unknown"
    start = parse_record({"type": "start", "ts": 1, "run_name": "r", "run_id": None, "total_steps": 4, "epochs": 1,
                          "steps_per_epoch": 4})
    assert start.resumed_from is None and start.resumed_step is None
    ckpt = parse_record({"type": "checkpoint", "ts": 1, "epoch": 0, "step": 3, "path": "p", "val_loss": 1.0,
                         "is_best": True})  # a line written before --best-by
    assert ckpt.best_by == "val-loss" and ckpt.score is None
