"""The Compare page's refresh (app/metric_feed.py) reads only the metric rows written since the
last one, and its chart data equals a full reread of the run (what the page did before)."""

from __future__ import annotations

import pandas as pd

from app import metric_feed, views
from runstore import metrics, open_store, runs, stages
from speculators.metric_records import TrainRecord, ValRecord
from tests.support.metric_reads import count_step_reads


def _train(step: int, loss: float) -> dict:
    return TrainRecord(epoch=(step - 1) // 10, step=step, total_steps=40,
                       metrics={"loss": loss, "full_acc_0": 1 / (1 + loss), "tokens": 64.0}, ts=100.0 + step).to_dict()


def _val(step: int, loss: float) -> dict:
    return ValRecord(epoch=(step - 1) // 10, step=step, metrics={"loss": loss}, ts=100.5 + step).to_dict()


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["series", "step"], kind="stable").reset_index(drop=True)


def test_a_refresh_reads_only_new_rows_and_draws_what_a_full_reread_draws(tmp_path, monkeypatch):
    factory = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with factory() as s:
        runs.create_run(s, run_id="a", name="a", spec={}, stages=["train"], work_dir=str(tmp_path / "a"))
        metrics.ingest_records(s, "a", [*(_train(i, 3.0 / i) for i in range(1, 21)), _val(10, 2.0), _val(20, 1.5)])
    fetched = count_step_reads(monkeypatch)
    cache = views.MetricCache()
    with factory() as s:
        assert metric_feed.refresh(cache, s, "a") == 22
        assert metric_feed.refresh(cache, s, "a") == 0  # nothing new: nothing read
        metrics.ingest_records(s, "a", [*(_train(i, 3.0 / i) for i in range(21, 26)), _val(25, 1.2)])
        assert metric_feed.refresh(cache, s, "a") == 6
        assert fetched == [22, 0, 6]
        full = views.metrics_long(metrics.step_records(s, "a"))  # the old page: every row, every time
    assert len(full) == len(cache.frame())
    pd.testing.assert_frame_equal(_sorted(cache.frame()), _sorted(full))
    for metric in ("loss", "full_acc_0"):  # and the compare chart built from either is the same
        a = views.compare_frame({"a": cache.frame()}, {}, metric, "epoch", 0.6)
        b = views.compare_frame({"a": full}, {}, metric, "epoch", 0.6)
        pd.testing.assert_frame_equal(_sorted(a), _sorted(b))


def test_a_new_train_attempt_reads_the_run_again(tmp_path, monkeypatch):
    """A resumed train stage re-emits steps with new values: the cache starts over."""
    factory = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with factory() as s:
        runs.create_run(s, run_id="a", name="a", spec={}, stages=["train"], work_dir=str(tmp_path / "a"))
        metrics.ingest_records(s, "a", [_train(i, 1.0) for i in range(1, 6)])
    fetched = count_step_reads(monkeypatch)
    cache = views.MetricCache()
    with factory() as s:
        metric_feed.refresh(cache, s, "a")
        stage = stages.get_stage(s, "a", "train")
        stage.attempts += 1
        s.commit()
        metrics.ingest_records(s, "a", [_train(i, 2.0) for i in range(4, 6)])  # steps 4-5 again, new values
        metric_feed.refresh(cache, s, "a")
    assert fetched == [5, 5]
    losses = cache.frame().query("metric == 'loss'").set_index("step")["value"].to_dict()
    assert losses == {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 2.0}
