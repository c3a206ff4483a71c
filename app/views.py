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


def runs_rows(runs: list[Run], now: datetime | None = None) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        spec = r.spec or {}
        rows.append({
            "run": r.id,
            "name": r.name,
            "status": display_status(r),
            "stage": stage_label(r),
            "progress": round(run_progress(r), 4),
            "age": age(r.created_at, now),
            "mode": spec.get("mode", ""),
            "model": spec.get("model", ""),
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


def metrics_long(records: list[StepRecord]) -> pd.DataFrame:
    """One row per (type, step, metric) for Altair; `series` is e.g. `train loss_0`."""
    return pd.DataFrame(_long_rows(records), columns=["type", "step", "epoch", "metric", "value", "series"])


def _long_rows(records: list[StepRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for key, value in rec.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # null: a non-finite value
                rows.append({"type": rec.TYPE, "step": rec.step, "epoch": rec.epoch, "metric": key,
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
        cols = ["type", "step", "epoch", "metric", "value", "series"]
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
