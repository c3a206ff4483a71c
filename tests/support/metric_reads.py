"""Count the metric rows the store hands to a dashboard page: the pages' incremental reads
(app/metric_feed.py) go through `runstore.metrics.step_records`, filtered by step in SQL."""

from __future__ import annotations


def count_step_reads(monkeypatch) -> list[int]:
    """Patch `step_records` to record how many rows each call returned; the list fills as the page runs."""
    from runstore import metrics

    fetched: list[int] = []
    real = metrics.step_records

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        fetched.append(len(out))
        return out

    monkeypatch.setattr(metrics, "step_records", spy)
    return fetched
