"""The dashboard's pure record -> table/chart functions (app/views.py, app/charts.py) and the
run-store queries behind them, against direct computations: smoothing, the x axes, the
whole-run export, run scores, checkpoints (mid-epoch ones too) and settings side by side."""

from __future__ import annotations

import csv
import io
import json
import math

import pandas as pd
import pytest

from app import charts, views
from runstore import metrics, open_store, runs
from speculators.metric_records import (
    AcceptanceRecord,
    CheckpointRecord,
    StepCheckpointRecord,
    TrainRecord,
    ValRecord,
    parse_line,
)


def _train(step: int, epoch: int, ts: float, loss: float, tokens: float | None = 64.0) -> TrainRecord:
    m = {"loss": loss, "full_acc_0": 1.0 / (1 + loss), "lr": 1e-3}
    if tokens is not None:
        m["tokens"] = tokens
    return TrainRecord(epoch=epoch, step=step, total_steps=12, metrics=m, ts=ts)


def _acc(step: int, epoch: int, mean: float, rates: list[float], ts: float = 0.0) -> AcceptanceRecord:
    return AcceptanceRecord(epoch=epoch, step=step, mean_acceptance_length=mean, acceptance_rate_per_position=rates,
                            prompts=4, tokens=64, seconds=0.25, ts=ts)


# steps 1-4 epoch 0, 5-8 epoch 1, 9-10 of epoch 2 (running); a token count that varies per step
TRAIN = [_train(s, (s - 1) // 4, 1000.0 + 30 * s, 3.0 / s + (0.3 if s % 3 == 0 else 0.0), tokens=50.0 + s)
         for s in range(1, 11)]
VAL = [ValRecord(epoch=0, step=4, metrics={"loss": 1.1, "full_acc_0": 0.4}, ts=1125.0),
       ValRecord(epoch=1, step=8, metrics={"loss": 0.9, "full_acc_0": 0.5}, ts=1245.0)]
ACC = [_acc(2, 0, 1.3, [0.3, 0.1], 1061.0), _acc(4, 0, 1.5, [0.4, 0.1], 1121.0),
       _acc(8, 1, 1.45, [0.35, 0.1], 1241.0)]


def test_smoothing_is_the_debiased_ema():
    """s_t = sum_i w^(t-i) (1-w) x_i / (1 - w^(t+1)): a weighted mean of the points so far,
    computed here directly for each t."""
    xs = [5.0, 3.0, 4.0, 1.0, 2.0, 0.5, 0.25]
    for w in (0.0, 0.3, 0.6, 0.95):
        direct = [sum(w ** (t - i) * (1 - w) * xs[i] for i in range(t + 1)) / (1 - w ** (t + 1))
                  for t in range(len(xs))]
        assert views.ema(xs, w) == pytest.approx(direct, rel=1e-12)
    assert views.ema(xs, 0.0) == xs
    with pytest.raises(ValueError, match="smoothing weight"):
        views.ema(xs, 1.0)


def test_smooth_keeps_series_apart_and_in_step_order():
    df = views.metrics_long([*TRAIN, *VAL])
    shuffled = df.sample(frac=1.0, random_state=0)
    out = views.smooth(shuffled, 0.6)
    for series, part in out.groupby("series"):
        part = part.sort_values("step")
        assert list(part["smoothed"]) == pytest.approx(views.ema(list(part["value"]), 0.6)), series
    val_loss = out[out["series"] == "val loss"].sort_values("step")
    assert list(val_loss["smoothed"]) == pytest.approx([1.1, (0.6 * 0.4 * 1.1 + 0.4 * 0.9) / (1 - 0.36)])


def test_x_axes():
    df = views.metrics_long([*TRAIN, *VAL])
    train = df[df["type"] == "train"]
    loss = df[df["metric"] == "loss"]
    by = {axis: dict(zip(zip(loss["type"], loss["step"]), views.x_values(loss, axis, train, steps_per_epoch=4)))
          for axis in views.X_AXES}
    assert by["step"][("train", 7)] == 7.0
    # wall time: minutes since the first record (step 1 at ts 1030)
    assert by["wall time"][("train", 5)] == pytest.approx((1150.0 - 1030.0) / 60)
    assert by["wall time"][("val", 8)] == pytest.approx((1245.0 - 1030.0) / 60)
    # tokens: the running sum of the train records' token counts, up to and including the step
    tokens = {s: sum(50.0 + k for k in range(1, s + 1)) for s in range(1, 11)}
    assert by["tokens"][("train", 6)] == tokens[6] and by["tokens"][("val", 8)] == tokens[8]
    # epoch: e + steps done in epoch e / its steps (an epoch-end val record sits at e + 1)
    assert by["epoch"][("train", 1)] == 0.25 and by["epoch"][("train", 6)] == 1.5
    assert by["epoch"][("val", 4)] == 1.0 and by["epoch"][("val", 8)] == 2.0
    assert by["epoch"][("train", 10)] == 2.5  # the running epoch: 2 of its 4 steps
    no_hint = views.x_values(loss[loss["step"] == 10], "epoch", train)
    assert list(no_hint) == [3.0]  # without the hint, the steps seen so far
    old = views.metrics_long([_train(1, 0, 1.0, 2.0, tokens=None)])
    assert math.isnan(views.x_values(old, "tokens", old).iloc[0])
    with pytest.raises(ValueError, match="unknown x axis"):
        views.x_values(loss, "time", train)


def test_chart_data_smooths_before_thinning():
    recs = [_train(s, 0, float(s), float(s % 7)) for s in range(1, 2001)]
    df = views.metrics_long(recs)
    loss = df[df["metric"] == "loss"]
    out = views.chart_data(loss, "step", 0.9, max_points=100)
    assert len(out) <= 101 and out["step"].max() == 2000
    full = views.ema([float(s % 7) for s in range(1, 2001)], 0.9)
    for _, row in out.iterrows():
        assert row["smoothed"] == pytest.approx(full[int(row["step"]) - 1])
        assert row["x"] == row["step"]


def test_export_holds_every_record():
    records = [*TRAIN, *VAL, *ACC]
    lines = views.export_jsonl(records).splitlines()
    back = [parse_line(line) for line in lines]
    assert sorted(back, key=lambda r: (r.TYPE, r.step)) == sorted(records, key=lambda r: (r.TYPE, r.step))
    assert [r.step for r in back] == sorted(r.step for r in back)
    rows = list(csv.DictReader(io.StringIO(views.export_csv(records))))
    assert len(rows) == len(records)
    for rec in records:
        (row,) = [r for r in rows if r["type"] == rec.TYPE and int(r["step"]) == rec.step]
        assert int(row["epoch"]) == rec.epoch and float(row["ts"]) == rec.ts
        if isinstance(rec, AcceptanceRecord):
            assert float(row["mean_acceptance_length"]) == rec.mean_acceptance_length
            assert [float(row[f"acceptance_rate_pos_{i + 1}"]) for i in range(2)] == rec.acceptance_rate_per_position
        else:
            for k, v in rec.metrics.items():
                assert float(row[k]) == v
            assert row.get("lr", "") == ("" if rec.TYPE == "val" else "0.001")


def test_run_scores_and_duration():
    sc = views.run_scores(VAL, ACC)
    assert (sc.best_val_loss, sc.best_val_step) == (min(r.metrics["loss"] for r in VAL), 8)
    assert (sc.best_acceptance, sc.best_acceptance_step) == (1.5, 4)
    assert views.run_scores([], []) == views.RunScores()


def test_checkpoint_rows_list_mid_epoch_checkpoints_with_their_acceptance():
    epoch = [CheckpointRecord(epoch=0, step=4, path="/c/epoch_0", val_loss=1.1, is_best=False),
             CheckpointRecord(epoch=1, step=8, path="/c/epoch_1", val_loss=0.9, is_best=True)]
    mid = [StepCheckpointRecord(epoch=0, step=2, path="/c/step_2", reason="interval"),
           StepCheckpointRecord(epoch=1, step=6, path="/c/step_6", reason="interval")]
    rows = views.checkpoint_rows(epoch, mid, ACC, exists=lambda p: p != "/c/step_2")
    assert [(r["step"], r["kind"]) for r in rows] == [(2, "mid-epoch (interval)"), (4, "epoch end"),
                                                      (6, "mid-epoch (interval)"), (8, "epoch end")]
    assert [r["acceptance"] for r in rows] == [1.3, 1.5, None, 1.45]
    assert [r["on disk"] for r in rows] == ["removed", "yes", "yes", "yes"]
    assert [r["best"] for r in rows] == ["", "", "", "★"]
    # the served checkpoint's training-time figure: its step's measurement, else the one before
    assert views.served_training_acceptance("/c/epoch_0/", epoch, mid, ACC).step == 4
    assert views.served_training_acceptance("/c/step_6", epoch, mid, ACC).step == 4
    assert views.served_training_acceptance("/elsewhere", epoch, mid, ACC) is None


def test_settings_side_by_side():
    a = {"name": "a", "model": "m", "dataset": "sharegpt", "lr": 1e-3, "epochs": 3}
    b = {**a, "name": "b", "lr": 3e-4}
    df = views.hparam_compare({"a": a, "b": b})
    lr = df[df["setting"] == "Learning rate"].iloc[0]
    assert (lr["a"], lr["b"], lr["differs"]) == ("0.001", "0.0003", True)
    only = views.hparam_compare({"a": a, "b": b}, only_differing=True)
    assert set(only["a"]) == {"a", "0.001"}  # name and lr alone differ
    rows = {r["key"]: r for r in views.hparam_rows(a)}
    assert rows["epochs"]["value"] == "3" and rows["ttt_steps"]["changed"] is False
    assert rows["best_by"]["value"] == "val-loss"


def test_compare_frame_overlays_runs():
    one, two = views.metrics_long([*TRAIN, *VAL]), views.metrics_long(TRAIN[:5])
    df = views.compare_frame({"one": one, "two": two}, {"one": ACC}, "loss", "step", 0.0)
    assert set(df["series"]) == {"train · one", "val · one", "train · two"}
    assert list(df[df["series"] == "train · two"]["value"]) == [r.metrics["loss"] for r in TRAIN[:5]]
    acc = views.compare_frame({"one": one, "two": two}, {"one": ACC}, views.ACCEPTANCE_METRIC, "epoch", 0.0)
    assert list(acc["value"]) == [1.3, 1.5, 1.45] and list(acc["x"]) == [0.5, 1.0, 2.0]
    assert views.compare_metrics({"one": one}, True)[0] == "loss"
    assert "tokens" not in views.compare_metrics({"one": one}, True)
    assert views.compare_metrics({"one": one}, True)[-1] == views.ACCEPTANCE_METRIC


def test_line_chart_has_legend_toggle_zoom_and_both_curves():
    df = views.chart_data(views.metrics_long(TRAIN).query("metric == 'loss'"), "tokens", 0.6)
    spec = charts.metric_chart("Loss · train", df, "tokens", smoothed=True).to_dict()
    params = spec.get("params", []) + [p for layer in spec["layer"] for p in layer.get("params", [])]
    assert {"shown", "zoom"} <= {p["name"] for p in params}
    assert any(p.get("bind") == "legend" for p in params) and any(p.get("bind") == "scales" for p in params)
    ys = [layer["encoding"]["y"]["field"] for layer in spec["layer"]]
    assert ys == ["smoothed", "value"]
    assert spec["layer"][0]["encoding"]["x"]["title"] == "tokens trained"
    assert spec["layer"][0]["encoding"]["color"]["legend"]["orient"] == "bottom"
    assert spec["title"] == "Loss · train (log)"
    flat = charts.metric_chart("Learning rate · train", df, "step", smoothed=False).to_dict()
    assert [layer["encoding"]["y"]["field"] for layer in flat["layer"]] == ["value"]


def test_store_keeps_mid_epoch_checkpoints_and_scores(tmp_path):
    factory = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with factory() as s:
        for rid in ("a", "b"):
            runs.create_run(s, run_id=rid, name=rid, spec={}, stages=["train"], work_dir=str(tmp_path / rid))
        recs = [r.to_dict() for r in [*TRAIN, *VAL, *ACC]]
        recs += [StepCheckpointRecord(epoch=0, step=2, path="/c/step_2", reason="interval", ts=5.0).to_dict(),
                 StepCheckpointRecord(epoch=2, step=10, path="/c/step_10", reason="SIGTERM", ts=6.0).to_dict()]
        metrics.ingest_records(s, "a", recs)
        metrics.ingest_records(s, "a", recs[-1:])  # re-read: no duplicate
        metrics.ingest_records(s, "b", [VAL[0].to_dict()])
        mids = metrics.step_checkpoints(s, "a")
        assert [(m.step, m.path, m.reason, m.epoch, m.ts) for m in mids] == [
            (2, "/c/step_2", "interval", 0, 5.0), (10, "/c/step_10", "SIGTERM", 2, 6.0)]
        assert metrics.step_checkpoints(s, "b") == []
        found = metrics.score_records(s, ["a", "b", "nope"])
        assert found["a"] == (VAL, ACC) and found["b"] == ([VAL[0]], []) and found["nope"] == ([], [])
        # the step records the charts read are untouched by the checkpoint rows
        assert [r.TYPE for r in metrics.step_records(s, "a")].count("train") == len(TRAIN)
    json.dumps(views.export_table([*TRAIN]).to_dict("records"))  # plain values


def test_run_labels_tell_same_names_apart():
    from runstore.models import Run

    rs = [Run(id="1", name="x"), Run(id="2", name="x"), Run(id="3", name="y")]
    assert views.run_labels(rs) == {"1": "x (1)", "2": "x (2)", "3": "y"}
    assert isinstance(pd.DataFrame(views.compare_rows([], {}, {})), pd.DataFrame)
