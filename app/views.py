"""Pure functions that turn run-store rows into what the pages show (tables, chart data,
progress, ETA), kept free of Streamlit so they test alone."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from runstore.models import ACTIVE_RUN, Run, RunStatus, Stage, StageStatus, utcnow
from speculators.metric_records import AcceptanceRecord, TrainRecord, ValRecord

StepRecord = TrainRecord | ValRecord

# Chart groups on the run page: a title and a test for the metric keys it plots. The
# accuracies' meanings are defined in docs/training.md (Metrics); a title says which one.
CHART_GROUPS: list[tuple[str, re.Pattern[str]]] = [
    ("Loss", re.compile(r"^loss(_\d+)?$")),
    ("Full accuracy: steps 0..k all right", re.compile(r"^full_acc_\d+$")),
    ("Conditional accuracy: step k given 0..k-1 right", re.compile(r"^cond_acc_\d+$")),
    ("Step accuracy: step k alone", re.compile(r"^step_acc_\d+$")),
    ("Learning rate", re.compile(r"^lr$")),
    ("Throughput (tokens/s)", re.compile(r"^tokens_per_s$")),
]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def age(ts: datetime | None, now: datetime | None = None) -> str:
    if ts is None:
        return ""
    return fmt_duration(((now or utcnow()) - ts).total_seconds())


def stage_fraction(stage: Stage) -> float:
    if stage.status == StageStatus.SUCCEEDED:
        return 1.0
    if stage.status == StageStatus.RUNNING and stage.total_steps and stage.current_step:
        return min(0.99, stage.current_step / stage.total_steps)  # 100% only once it has finished
    return 0.0


def run_progress(run: Run) -> float:
    """Share of the run done: each stage counts equally, training by its step."""
    if not run.stages:
        return 0.0
    return sum(stage_fraction(s) for s in run.stages) / len(run.stages)


# Streamlit's own alert colours (light theme), so a plain-text alert looks like st.error & co.
_ALERT_STYLE = {
    "error": ("rgba(255, 43, 43, 0.09)", "rgb(125, 53, 59)"),
    "warning": ("rgba(255, 227, 18, 0.1)", "rgb(146, 108, 5)"),
    "info": ("rgba(28, 131, 225, 0.1)", "rgb(0, 66, 128)"),
    "success": ("rgba(33, 195, 84, 0.1)", "rgb(23, 114, 51)"),
}


def alert_html(kind: str, text: str, icon: str = "") -> str:
    """An alert box (`kind`: error, warning, info, success; `caption`: small grey text) whose
    text is HTML-escaped and never read as Markdown, for `st.html`. `st.error` and friends
    render Markdown, and escaping Markdown does not stop GFM from linking a bare URL, so any
    message that may quote a user's text (a field error echoes the value typed) goes here."""
    body = html.escape(f"{icon} {text}" if icon else text)
    if kind == "caption":
        return (f'<div data-spec-alert="caption" style="font-size: 0.875rem; color: rgba(49, 51, 63, 0.6); '
                f'white-space: pre-wrap; overflow-wrap: anywhere">{body}</div>')
    bg, fg = _ALERT_STYLE[kind]
    return (f'<div data-spec-alert="{kind}" role="alert" style="background: {bg}; color: {fg}; '
            f'padding: 0.75rem 1rem; border-radius: 0.5rem; white-space: pre-wrap; overflow-wrap: anywhere">'
            f"{body}</div>")


def heading_html(text: str) -> str:
    """A run name as the page heading for `st.html`: HTML-escaped, so it shows exactly as typed."""
    return f"<h1>{html.escape(text)}</h1>"


def display_status(run: Run) -> str:
    """The state a user should see. A run between stages (its next stage queued, or nothing
    running while it is marked running) is `waiting`, not `running` with a stale stage."""
    if run.status in ACTIVE_RUN:
        live = any(s.status == StageStatus.RUNNING for s in run.stages)
        started = any(s.status == StageStatus.SUCCEEDED or s.started_at for s in run.stages)
        if not live and started:
            return "waiting"
        if run.status == RunStatus.RUNNING and not live:
            return "waiting"
    return run.status


def stage_label(run: Run) -> str:
    """The running stage, or for a waiting run the stage it waits to start."""
    live = next((s.name for s in run.stages if s.status == StageStatus.RUNNING), None)
    if live:
        return live
    if run.status in ACTIVE_RUN:
        nxt = next((s.name for s in sorted(run.stages, key=lambda x: x.position) if s.status != StageStatus.SUCCEEDED),
                   None)
        return f"next: {nxt}" if nxt else ""
    return run.current_stage or ""


def acceptance_summary(report: dict[str, Any]) -> tuple[str, str | None]:
    """(mean acceptance length as shown, note). With nothing drafted yet there is no mean:
    a bare 1.00 would read as a useless draft."""
    if not report.get("num_draft_tokens"):
        return "n/a", "No drafted tokens yet: send requests to the endpoint to measure acceptance."
    return f"{report['mean_acceptance_length']:.2f}", None


def runs_rows(runs: list[Run], now: datetime | None = None,
              scores: dict[str, RunScores] | None = None) -> list[dict[str, Any]]:
    """The runs table: one row per run; `scores` (by run id) adds best val loss and best acceptance."""
    rows = []
    for r in runs:
        spec = r.spec or {}
        sc = (scores or {}).get(r.id) or RunScores()
        rows.append({
            "run": r.id,
            "name": r.name,
            "status": display_status(r),
            "stage": stage_label(r),
            "progress": round(run_progress(r), 4),
            "age": age(r.created_at, now),
            "mode": spec.get("mode", ""),
            "model": spec.get("model", ""),
            "best val loss": sc.best_val_loss,
            "best acceptance": sc.best_acceptance,
            "duration": fmt_duration(run_duration(r, now)),
            "error": r.error or "",
            "detail": f"/Run_detail?run={r.id}",
        })
    return rows


def stage_rows(stages: list[Stage], now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or utcnow()
    rows = []
    for s in stages:
        end = s.finished_at or (now if s.status == StageStatus.RUNNING else None)
        rows.append({
            "stage": s.name,
            "state": s.status,
            "started": s.started_at.strftime("%Y-%m-%d %H:%M:%S") if s.started_at else "",
            "duration": fmt_duration((end - s.started_at).total_seconds()) if s.started_at and end else "",
            "attempts": s.attempts,
            "host": s.host or "",  # the machine that ran (runs) it: installations with several hosts
            "step": f"{s.current_step}/{s.total_steps}" if s.total_steps else "",
            "error": s.error or "",
        })
    return rows


MAX_POINTS = 400  # per series on a chart: a readable curve, cheap to send and to draw
LONG_COLUMNS = ["type", "step", "epoch", "ts", "metric", "value", "series"]


def metrics_long(records: list[StepRecord]) -> pd.DataFrame:
    """One row per (type, step, metric) for Altair; `series` is e.g. `train loss_0`."""
    return pd.DataFrame(_long_rows(records), columns=LONG_COLUMNS)


def _long_rows(records: list[StepRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for key, value in rec.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # null: a non-finite value
                rows.append({"type": rec.TYPE, "step": rec.step, "epoch": rec.epoch, "ts": rec.ts, "metric": key,
                             "value": float(value), "series": f"{rec.TYPE} {key}"})
    return rows


@dataclass
class MetricCache:
    """One run's chart data, kept per browser session and extended on each refresh with the
    rows written since (`after()` is what to ask the store for). A new attempt of the train
    stage (a resume re-emits steps with new values) starts it over (`reset_for`)."""

    key: tuple = ()
    last: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    train_points: list[tuple[int, float]] = field(default_factory=list)
    version: int = 0
    _frame: pd.DataFrame | None = None
    _framed: int = 0  # rows already in _frame

    def reset_for(self, key: tuple) -> bool:
        if key == self.key:
            return False
        self.key, self.last, self.rows, self.train_points = key, {}, [], []
        self._frame, self._framed = None, 0
        self.version += 1
        return True

    def after(self) -> dict[str, int]:
        return dict(self.last)

    def add(self, records: list[StepRecord]) -> int:
        """Append new records' rows (ignoring any at or before the last step seen of its type)."""
        fresh = [r for r in records if r.step > self.last.get(r.TYPE, -1)]
        for r in fresh:
            self.last[r.TYPE] = max(self.last.get(r.TYPE, -1), r.step)
            if isinstance(r, TrainRecord):
                self.train_points.append((r.step, r.ts))
        if fresh:
            self.rows += _long_rows(fresh)
            self.version += 1
        return len(fresh)

    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame; new rows are appended to the one built before."""
        cols = LONG_COLUMNS
        if self._frame is None or self._framed < len(self.rows):
            new = pd.DataFrame(self.rows[self._framed:], columns=cols)
            self._frame = new if self._frame is None or self._frame.empty else \
                pd.concat([self._frame, new], ignore_index=True)
            self._framed = len(self.rows)
        return self._frame


def thin(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most about `max_points` rows per series: every k-th step, the last one always kept."""
    if df.empty or df.groupby("series").size().max() <= max_points:
        return df
    parts = []
    for _, part in df.groupby("series", sort=False):
        k = -(-len(part) // max_points)
        keep = part.iloc[::k]
        if keep.index[-1] != part.index[-1]:
            keep = pd.concat([keep, part.iloc[[-1]]])
        parts.append(keep)
    return pd.concat(parts)


def chart_frames(df: pd.DataFrame, max_points: int = MAX_POINTS) -> list[tuple[str, pd.DataFrame]]:
    out = []
    for title, pattern in CHART_GROUPS:
        part = df[df["metric"].map(lambda k, p=pattern: bool(p.match(k)))] if not df.empty else df
        if not part.empty:
            out.append((title, thin(part, max_points)))
    return out


def train_eta(points: list[tuple[int, float]], total_steps: int | None) -> tuple[float, float | None]:
    """(fraction done, seconds left) from the train records' (step, timestamp) pairs. The rate
    uses the records since the last resume (a gap in time would skew it otherwise)."""
    if not points or not total_steps:
        return 0.0, None
    pts = sorted(points)
    step, ts = pts[-1]
    frac = min(1.0, step / total_steps)
    # the newest contiguous stretch: stop at a backwards jump in time (a resume re-emits steps)
    first_step, first_ts = pts[-1]
    for s_, t_ in reversed(pts[:-1]):
        if t_ > first_ts:
            break
        first_step, first_ts = s_, t_
    if step == first_step or ts <= first_ts:
        return frac, None
    rate = (step - first_step) / (ts - first_ts)
    return frac, max(0.0, (total_steps - step) / rate)


def prepare_summary(work_dir: str) -> tuple[str, bool] | None:
    """(what the prepare stage kept and dropped, whether it dropped most), from the
    `prepare_config.json` it wrote; None before it has run."""
    import json
    from pathlib import Path

    try:
        counts = json.loads((Path(work_dir) / "prepared" / "prepare_config.json").read_text())["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kept, dropped = int(counts.get("kept", 0)), dict(counts.get("dropped") or {})
    total = sum(dropped.values())
    text = f"prepare kept {kept} conversations, truncated {counts.get('truncated', 0)}, dropped {total}"
    if dropped:
        text += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) + ")"
    return text, total > kept


def acceptance_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"position": i + 1, "acceptance rate": r}
            for i, r in enumerate(report.get("acceptance_rate_per_position") or [])]


def acceptance_curve(records: list[AcceptanceRecord]) -> pd.DataFrame:
    """Mean acceptance length over training steps (one row per acceptance record)."""
    return pd.DataFrame([{"step": r.step, "epoch": r.epoch, "mean acceptance length": r.mean_acceptance_length,
                          "seconds": r.seconds} for r in records],
                        columns=["step", "epoch", "mean acceptance length", "seconds"])


def acceptance_positions(record: AcceptanceRecord) -> pd.DataFrame:
    """The per-position acceptance rates of one record (position 1 = the first drafted token)."""
    return pd.DataFrame(acceptance_rows({"acceptance_rate_per_position": record.acceptance_rate_per_position}),
                        columns=["position", "acceptance rate"])


# ---------------------------------------------------------------- smoothing, x axes, export, compare

X_AXES: dict[str, str] = {"step": "step", "epoch": "epoch", "tokens": "tokens trained", "wall time": "wall time (min)"}


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with the start debiased (TensorBoard's and W&B's smoothing):
    s_t = weight * s_{t-1} + (1 - weight) * x_t from s_{-1} = 0, divided by 1 - weight^(t+1), so
    the first point is x_0 and not pulled towards 0. `weight` 0 leaves the values as they are."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for t, x in enumerate(values):
        last = weight * last + (1.0 - weight) * x
        out.append(last / (1.0 - weight ** (t + 1)))
    return out


def smooth(df: pd.DataFrame, weight: float, by: str = "series", order: str = "step") -> pd.DataFrame:
    """`df` with a `smoothed` column: the EMA of `value` within each `by` group, in `order`."""
    if df.empty:
        return df.assign(smoothed=pd.Series(dtype=float))
    df = df.sort_values([by, order], kind="stable")
    smoothed = df.groupby(by, sort=False)["value"].transform(lambda v: pd.Series(ema(list(v), weight), index=v.index))
    return df.assign(smoothed=smoothed)


def x_values(df: pd.DataFrame, axis: str, train: pd.DataFrame, steps_per_epoch: float | None = None) -> pd.Series:
    """Each row's position on `axis` (a key of X_AXES). `df` has `step`, `epoch`, `ts`; `train`
    is the run's train rows (`metrics_long` of its train records): the reference for the epoch
    fraction, the tokens trained up to a step (the running sum of the train records' `tokens`)
    and the run's start time.

    epoch: e + (steps done in epoch e) / (its steps), an epoch's steps counted from its train
    records once the next epoch has begun, else `steps_per_epoch` (or the steps seen so far).
    wall time: minutes since the run's first record. tokens: NaN without `tokens` metrics."""
    if df.empty:
        return pd.Series(dtype=float, index=df.index)
    if axis == "step":
        return df["step"].astype(float)
    if axis == "wall time":
        t0 = min(df["ts"].min(), train["ts"].min()) if not train.empty else df["ts"].min()
        return (df["ts"] - t0) / 60.0
    if axis == "tokens":
        tok = train[train["metric"] == "tokens"].drop_duplicates("step", keep="last").sort_values("step")
        if tok.empty:
            return pd.Series(float("nan"), index=df.index)
        steps, cum = tok["step"].to_numpy(), tok["value"].cumsum().to_numpy()
        idx = steps.searchsorted(df["step"].to_numpy(), side="right") - 1
        return pd.Series([float(cum[i]) if i >= 0 else 0.0 for i in idx], index=df.index)
    if axis == "epoch":
        seen = train.drop_duplicates("step")[["step", "epoch"]].dropna()
        bounds = seen.groupby("epoch")["step"].agg(["min", "max"])
        last = bounds.index.max() if not bounds.empty else None

        def frac(step: int, epoch: Any) -> float:
            if epoch is None or pd.isna(epoch):
                return float("nan")
            epoch = int(epoch)
            if epoch not in bounds.index:
                return float(epoch)
            lo, hi = bounds.loc[epoch]
            length = hi - lo + 1
            if epoch == last and steps_per_epoch:
                length = max(length, steps_per_epoch)
            return epoch + (step - lo + 1) / length

        return pd.Series([frac(s_, e_) for s_, e_ in zip(df["step"], df["epoch"])], index=df.index, dtype=float)
    raise ValueError(f"unknown x axis {axis!r}: one of {', '.join(X_AXES)}")


def chart_data(df: pd.DataFrame, axis: str, weight: float, train: pd.DataFrame | None = None,
               steps_per_epoch: float | None = None, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Rows ready to plot: thinned per series, placed on `axis` (`x`), smoothed (`smoothed`).
    Smoothing runs over all the points before thinning, so thinning never changes a curve's level."""
    if df.empty:
        return df.assign(x=pd.Series(dtype=float), smoothed=pd.Series(dtype=float))
    ref = df[df["type"] == "train"] if train is None else train
    out = smooth(df, weight)
    out = thin(out, max_points)
    return out.assign(x=x_values(out, axis, ref, steps_per_epoch))


def split_frames(df: pd.DataFrame, kind: str, max_points: int = MAX_POINTS) -> list[tuple[str, pd.DataFrame]]:
    """`chart_frames` of one record type's rows (train or val), series named by metric alone:
    the run page shows training and validation in charts of their own."""
    part = df[df["type"] == kind] if not df.empty else df
    part = part.assign(series=part["metric"]) if not part.empty else part
    return chart_frames(part, max_points)


def record_sort_key(rec: Any) -> tuple[int, int, float]:
    order = {"train": 0, "val": 1, "acceptance": 2, "checkpoint": 3, "step_checkpoint": 4}
    return (getattr(rec, "step", 0), order.get(rec.TYPE, 9), rec.ts)


def export_jsonl(records: list[Any]) -> str:
    """The run's records as metrics.jsonl lines (speculators.metric_records: `parse_line` reads
    each back), by step."""
    return "".join(r.to_json() + "\n" for r in sorted(records, key=record_sort_key))


def export_table(records: list[Any]) -> pd.DataFrame:
    """One row per train, val or acceptance record (type, step, epoch, ts, then every metric;
    an acceptance record's per-position rates as `acceptance_rate_pos_<i>`, 1 = first drafted token)."""
    rows = []
    for r in sorted(records, key=record_sort_key):
        row: dict[str, Any] = {"type": r.TYPE, "step": r.step, "epoch": r.epoch, "ts": r.ts}
        if isinstance(r, (TrainRecord, ValRecord)):
            row.update(r.metrics)
        elif isinstance(r, AcceptanceRecord):
            row.update(mean_acceptance_length=r.mean_acceptance_length, prompts=r.prompts, tokens_generated=r.tokens,
                       seconds=r.seconds)
            row.update({f"acceptance_rate_pos_{i + 1}": v for i, v in enumerate(r.acceptance_rate_per_position)})
        else:
            continue
        rows.append(row)
    head = ["type", "step", "epoch", "ts"]
    rest = sorted({k for row in rows for k in row} - set(head))
    return pd.DataFrame(rows, columns=head + rest)


def export_csv(records: list[Any]) -> str:
    return export_table(records).to_csv(index=False)


@dataclass(frozen=True)
class RunScores:
    """A run's best figures: the lowest validation loss and the highest mean acceptance length
    measured while training, each with its step."""

    best_val_loss: float | None = None
    best_val_step: int | None = None
    best_acceptance: float | None = None
    best_acceptance_step: int | None = None


def run_scores(val: list[ValRecord], acceptance: list[AcceptanceRecord]) -> RunScores:
    losses = [(r.metrics["loss"], r.step) for r in val if isinstance(r.metrics.get("loss"), (int, float))]
    accs = [(r.mean_acceptance_length, r.step) for r in acceptance]
    vl = min(losses, key=lambda p: p[0]) if losses else (None, None)
    ac = max(accs, key=lambda p: p[0]) if accs else (None, None)
    return RunScores(vl[0], vl[1], ac[0], ac[1])


def run_duration(run: Run, now: datetime | None = None) -> float | None:
    """Seconds from the first stage's start to the run's end (now while it is active)."""
    starts = [s.started_at for s in run.stages if s.started_at]
    if not starts:
        return None
    if run.status in ACTIVE_RUN:
        end = now or utcnow()
    else:
        ends = [s.finished_at for s in run.stages if s.finished_at]
        end = run.finished_at or (max(ends) if ends else None)
    return (end - min(starts)).total_seconds() if end else None


def hparam_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's settings (the run schema's fields, in its order): label, key, value as shown,
    and whether it differs from the schema's default."""
    from speculators.config.run import RunSettings

    rows = []
    for name, info in RunSettings.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        value = spec.get(name, default)
        rows.append({"setting": info.title or name, "key": name, "value": _shown(value),
                     "default": _shown(default), "changed": value != default})
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def hparam_compare(specs: dict[str, dict[str, Any]], only_differing: bool = False) -> pd.DataFrame:
    """Settings side by side, one column per run label; `differs` marks a setting whose value
    is not the same in every run."""
    per = {label: {r["key"]: r for r in hparam_rows(spec)} for label, spec in specs.items()}
    keys = list(next(iter(per.values())).keys()) if per else []
    rows = []
    for k in keys:
        values = {label: per[label][k]["value"] for label in per}
        differs = len(set(values.values())) > 1
        if only_differing and not differs:
            continue
        rows.append({"setting": next(iter(per.values()))[k]["setting"], **values, "differs": differs})
    return pd.DataFrame(rows, columns=["setting", *specs.keys(), "differs"])


def acceptance_at(records: list[AcceptanceRecord], step: int) -> AcceptanceRecord | None:
    """The acceptance measured at `step`, else the latest one before it (None if none)."""
    before = [r for r in records if r.step <= step]
    exact = [r for r in before if r.step == step]
    return (exact or before or [None])[-1]


def checkpoint_rows(epoch_ckpts: list[Any], step_ckpts: list[Any], acceptance: list[AcceptanceRecord],
                    exists: Any = None) -> list[dict[str, Any]]:
    """Epoch-end and mid-epoch checkpoints by step, each with the acceptance measured at its
    step (if any) and whether its directory is still on disk (`exists(path)`; keep-last may
    have removed it)."""
    at_step = {r.step: r.mean_acceptance_length for r in acceptance}
    rows = []
    for c in epoch_ckpts:
        rows.append({"step": c.step, "epoch": c.epoch, "kind": "epoch end", "val loss": c.val_loss,
                     "acceptance": at_step.get(c.step), "best": "★" if c.is_best else "", "path": c.path})
    for c in step_ckpts:
        rows.append({"step": c.step, "epoch": c.epoch, "kind": f"mid-epoch ({c.reason})", "val loss": None,
                     "acceptance": at_step.get(c.step), "best": "", "path": c.path})
    rows.sort(key=lambda r: (r["step"], r["kind"] != "epoch end"))
    if exists is not None:
        for r in rows:
            r["on disk"] = "yes" if exists(r["path"]) else "removed"
    return rows


def compare_frame(runs_long: dict[str, pd.DataFrame], runs_acceptance: dict[str, list[AcceptanceRecord]],
                  metric: str, axis: str, weight: float, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """One metric of several runs on one axis: rows (run, series, x, value, smoothed), the
    series `train · <run>` / `val · <run>` (the kind first: a long run name is cut in the legend); `metric` "mean acceptance length" takes the runs'
    acceptance records."""
    parts = []
    for label, long in runs_long.items():
        train = long[long["type"] == "train"] if not long.empty else long
        if metric == ACCEPTANCE_METRIC:
            recs = runs_acceptance.get(label) or []
            part = pd.DataFrame([{"type": "acceptance", "step": r.step, "epoch": r.epoch, "ts": r.ts, "metric": metric,
                                  "value": r.mean_acceptance_length, "series": f"acceptance · {label}"} for r in recs],
                                columns=LONG_COLUMNS)
        else:
            part = long[long["metric"] == metric] if not long.empty else long
            part = part.assign(series=part["type"] + " · " + label) if not part.empty else part
        if part.empty:
            continue
        data = chart_data(part, axis, weight, train=train, max_points=max_points)
        parts.append(data.assign(run=label))
    cols = [*LONG_COLUMNS, "smoothed", "x", "run"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


ACCEPTANCE_METRIC = "mean acceptance length"


def compare_metrics(runs_long: dict[str, pd.DataFrame], has_acceptance: bool) -> list[str]:
    """The metrics the compare page offers: those any chosen run has (loss first), then acceptance."""
    keys: set[str] = set()
    for long in runs_long.values():
        if not long.empty:
            keys |= set(long["metric"])
    keys.discard("tokens")
    out = sorted(keys, key=lambda k: (k != "loss", k))
    return out + ([ACCEPTANCE_METRIC] if has_acceptance else [])


def served_training_acceptance(model_path: str, epoch_ckpts: list[Any], step_ckpts: list[Any],
                               records: list[AcceptanceRecord]) -> AcceptanceRecord | None:
    """The acceptance measured while training at the served checkpoint's step (found by its
    path among the run's checkpoints), else the latest before it; None when the checkpoint is
    not the run's or nothing was measured by then."""
    norm = model_path.rstrip("/")
    step = next((c.step for c in [*epoch_ckpts, *step_ckpts] if str(c.path).rstrip("/") == norm), None)
    return None if step is None else acceptance_at(records, step)


def run_labels(runs: list[Run]) -> dict[str, str]:
    """A short label per run id for legends and columns: its name, with the id added where
    two runs share a name."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    return {r.id: r.name if counts[r.name] == 1 else f"{r.name} ({r.id})" for r in runs}


def compare_rows(runs: list[Run], labels: dict[str, str], scores: dict[str, RunScores],
                 now: datetime | None = None) -> list[dict[str, Any]]:
    """The compare page's table: each chosen run's status, best figures with their steps, duration."""
    rows = []
    for r in runs:
        sc = scores.get(r.id) or RunScores()
        rows.append({"run": labels[r.id], "status": display_status(r), "best val loss": sc.best_val_loss,
                     "at step": sc.best_val_step, "best acceptance": sc.best_acceptance,
                     "acceptance step": sc.best_acceptance_step, "duration": fmt_duration(run_duration(r, now)),
                     "epochs": (r.spec or {}).get("epochs"), "lr": (r.spec or {}).get("lr"),
                     "detail": f"/Run_detail?run={r.id}"})
    return rows
