"""Progress a pipeline stage reports for the dashboard's bar.

A stage process appends `ProgressRecord` lines (`{"type": "progress", "ts", "done", "total"}`) to the
JSONL file named by `$SPECULATORS_PROGRESS_FILE` (the worker sets it for each stage and tails
the file as it tails the trainer's metrics.jsonl); without the variable nothing is written.
Lines are throttled to one per `every_s` seconds, the last one (done == total) always.
"""

from __future__ import annotations

import os
import time

from speculators.metric_records import ProgressRecord

ENV = "SPECULATORS_PROGRESS_FILE"


class Progress:
    def __init__(self, every_s: float = 1.0) -> None:
        self.path = os.environ.get(ENV) or None
        self.every_s = every_s
        self._last = 0.0

    def update(self, done: int, total: int | None) -> None:
        if self.path is None or not total:
            return
        now = time.time()
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        line = ProgressRecord(done=int(min(done, total)), total=int(total), ts=now).to_json()
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError:
            self.path = None  # progress is a courtesy: never fail the stage over it
