"""The typed records of a training run's metrics stream (`metrics.jsonl`).

One schema for the writer (the trainer's metrics sink), the reader that stores records
(`runstore`) and the dashboard: each record type is a frozen dataclass whose fields are the
JSON keys of its line, plus `type` and `ts`. `parse_record` turns a JSON object back into its
record, or None for an unknown type or a malformed line, so a reader skips what it does not
understand instead of guessing. Non-finite floats are written as null (JSON has no NaN).

This module imports nothing of the project: `runstore` and `app` may import it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class Record:
    """Base of every record: `type` (the class's TYPE) and `ts` (seconds since the epoch)."""

    TYPE: ClassVar[str] = ""
    ts: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "ts": self.ts}
        for f in fields(self):
            if f.name != "ts":
                out[f.name] = _clean(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class StartRecord(Record):
    TYPE: ClassVar[str] = "start"
    run_name: str
    run_id: str | None
    total_steps: int
    epochs: int
    steps_per_epoch: int
    resumed_from: str | None = None
    resumed_step: int | None = None


@dataclass(frozen=True)
class TrainRecord(Record):
    """One optimizer step's metrics (`loss`, `loss_k`, `full_acc_k`, ..., `lr`, `tokens_per_s`)."""

    TYPE: ClassVar[str] = "train"
    epoch: int
    step: int
    total_steps: int
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class ValRecord(Record):
    """Validation metrics at an epoch end (same keys as a train record's, without lr)."""

    TYPE: ClassVar[str] = "val"
    epoch: int
    step: int
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class CheckpointRecord(Record):
    """An epoch-end checkpoint. `val_loss`: the epoch's validation loss (its training loss without a
    validation split); `best_by` names the score `checkpoint_best` is chosen by (`val-loss`, lower
    is better, or `acceptance`, higher is better) and `score` is this epoch's value of it."""

    TYPE: ClassVar[str] = "checkpoint"
    epoch: int
    step: int
    path: str
    val_loss: float | None
    is_best: bool
    best_by: str = "val-loss"
    score: float | None = None


@dataclass(frozen=True)
class AcceptanceRecord(Record):
    """Speculative decoding of the draft at `step` with the verifier on the run's fixed held-out
    prompts (speculators.train.acceptance): `mean_acceptance_length` counts the bonus token
    (vLLM's figure), `acceptance_rate_per_position[i]` is the share of drafts whose token i was
    accepted; `prompts`, `tokens` (generated) and `seconds` say what it cost."""

    TYPE: ClassVar[str] = "acceptance"
    epoch: int
    step: int
    mean_acceptance_length: float
    acceptance_rate_per_position: list[float]
    prompts: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class StepCheckpointRecord(Record):
    """A mid-epoch checkpoint (`reason`: interval, max_steps or the signal's name)."""

    TYPE: ClassVar[str] = "step_checkpoint"
    epoch: int
    step: int
    path: str
    reason: str


@dataclass(frozen=True)
class EndRecord(Record):
    """The run ended: `status` completed or interrupted (then `signal` names it)."""

    TYPE: ClassVar[str] = "end"
    status: str
    signal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.signal is None:  # a completed run's line has no `signal` key (as the trainer always wrote it)
            del out["signal"]
        return out


@dataclass(frozen=True)
class ProgressRecord(Record):
    """A pipeline stage's progress (`speculators.progress`), `done` of `total` items."""

    TYPE: ClassVar[str] = "progress"
    done: int
    total: int


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TYPE: cls
    for cls in (StartRecord, TrainRecord, ValRecord, AcceptanceRecord, CheckpointRecord, StepCheckpointRecord,
                EndRecord, ProgressRecord)
}

#: Record types that carry a step's metrics (the ones the run store keeps per step).
STEP_METRIC_TYPES = (TrainRecord.TYPE, ValRecord.TYPE)

def _type_ok(value: Any, annotation: str) -> bool:
    """Check a value against the (string) annotation's outer type; None only where allowed."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None:
        return "None" in options
    for option in options:
        base = option.split("[", 1)[0]
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
                 "list": (list,)}.get(base)
        if kinds is None:
            continue
        if isinstance(value, bool) and base in ("int", "float"):
            continue  # JSON true is not a step number
        if base == "list" and option == "list[float]" and isinstance(value, list):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return True
            continue
        if isinstance(value, kinds):
            return True
    return False


def parse_record(obj: Any) -> Record | None:
    """The typed record for a decoded JSON line, or None if it is not one we know."""
    if not isinstance(obj, dict):
        return None
    cls = RECORD_TYPES.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None:
        return None
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "ts":
            ts = obj.get("ts")
            kwargs["ts"] = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0
            continue
        if f.name not in obj:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                return None
            continue
        value = obj[f.name]
        if not _type_ok(value, str(f.type)):
            return None
        kwargs[f.name] = value
    return cls(**kwargs)


def parse_line(line: str) -> Record | None:
    """`parse_record` of one text line; a half-written or garbled line gives None."""
    try:
        return parse_record(json.loads(line))
    except (json.JSONDecodeError, ValueError):
        return None
