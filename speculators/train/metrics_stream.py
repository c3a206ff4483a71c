"""The machine-readable metrics stream (`metrics.jsonl`, see docs/ARCHITECTURE.md).

One JSON object per line, appended and flushed, so a dashboard tailing the file sees each
record as soon as it is written.  Each line is one typed record of
`speculators.metric_records`; the metrics sink (speculators.train.sink) is its one writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from speculators.atomic import atomic_write_text
from speculators.metric_records import Record


class MetricsStream:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            self._fh = open(self.path, "a", encoding="utf-8")

    def _repair_tail(self) -> None:
        """Terminate a half-written last line (killed run) so appended records stay parseable."""
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def drop_after(self, step: int) -> int:
        """Remove step records past `step` (a resumed run re-emits them); returns how many.

        Keeps every (type, step) unique in the file when a run resumes from a checkpoint
        older than its last logged step (a kill between checkpoints).
        """
        if self.path is None or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            record_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(record_step, int) and record_step > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            self.close()
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
            self._fh = open(self.path, "a", encoding="utf-8")
        return dropped

    def write(self, record: Record) -> None:
        if self._fh is None:
            return
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a metrics file, ignoring incomplete or garbled lines."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
