"""A page's chart data for one run, brought up to date from the run store with only the rows
written since its last refresh (the Run detail page redraws every 2-3 s, the Compare page every
5 s; rereading every metric row of long runs each time grows with the runs)."""

from __future__ import annotations

from typing import Any

from app.views import MetricCache
from runstore import metrics, stages


def attempt_of(train_stage: Any) -> tuple:
    """What identifies one attempt of the train stage: a resume re-emits steps with new
    values, so a new attempt starts the run's chart data over."""
    return (train_stage.attempts, train_stage.started_at) if train_stage is not None else (0, None)


_READ = object()


def refresh(cache: MetricCache, session, run_id: str, train_stage: Any = _READ) -> int:
    """Add the run's train/val rows newer than the last step `cache` has of each type (all of
    them after a new train attempt). `train_stage`: the run's train stage (None: it has none)
    where the caller has just read it, else it is read here. Returns how many records were read."""
    if train_stage is _READ:
        train_stage = stages.get_stage(session, run_id, "train")
    cache.reset_for(attempt_of(train_stage))
    return cache.add(metrics.step_records(session, run_id, cache.after()))
