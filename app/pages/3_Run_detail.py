"""One run: stages and timings, live metric charts (training and validation apart, smoothing,
x axis by step, epoch, tokens or wall time; the acceptance measured while training included),
progress and ETA, logs, checkpoints (mid-epoch ones too), serving the best checkpoint in vLLM
with its live acceptance beside the training-time figure, the run's settings and a whole-run
metrics export."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd
import streamlit as st

from app import charts as charts_lib
from app import common, metric_feed, serve_panel, views
from runstore import metrics, runs
from runstore.models import ACTIVE_RUN, RunStatus, StageStatus
from worker.procs import log_tail

st.set_page_config(page_title="Run detail", page_icon="📈", layout="wide")
common.ensure_dispatcher()
s = common.settings()
factory = common.store()

with factory() as session:
    all_runs = runs.list_runs(session)
if not all_runs:
    st.info("No runs yet.")
    common.page_link("pages/1_New_run.py", "Launch a run", "🚀")
    st.stop()
ids = [r.id for r in all_runs]
wanted = st.query_params.get("run")
labels = {r.id: f"{r.name} ({r.id})" for r in all_runs}
run_id = st.selectbox("Run", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=labels.get)
st.query_params["run"] = run_id


def _metric_cache(run_id: str, train_stage) -> views.MetricCache:
    """This session's chart data for the run, brought up to date with the rows written since
    the last refresh (only those are read: app/metric_feed.py, as on the Compare page)."""
    caches = st.session_state.setdefault("metric_caches", {})
    cache = caches.setdefault(run_id, views.MetricCache())
    with factory() as session:
        metric_feed.refresh(cache, session, run_id, train_stage)
    return cache


def status_line(run, stages) -> None:
    status = views.display_status(run)
    where = views.stage_label(run)
    shown_where = where if where and status in ("running", "waiting") else ""
    text = f"Status: {status}" + (f" · {'stage ' if status == 'running' else ''}{shown_where}" if shown_where else "")
    kind = {"succeeded": "success", "failed": "error", "cancelled": "warning",
            "interrupted": "warning"}.get(run.status, "info")
    down = common.broker_down() if run.status in ACTIVE_RUN else None
    if down:  # nothing moves until the broker is back: say so, not just "waiting"
        text += f" · broker unreachable: {s.broker_url}"
        kind = "error" if status != "running" else "warning"
    common.alert(kind, text)
    if down:
        common.alert("caption", f"{down}. Finished stages are kept and the next one is queued as soon as "
                     "the broker answers again.")
    for x in stages:
        if x.status == StageStatus.RUNNING and x.error:  # what a running stage waits for, e.g. its vLLM URL
            common.alert("warning", f"{x.name}: {x.error}")
    if run.error:
        common.alert("error", run.error)  # plain text: it may quote the run's name or a URL


# Three fragments, each redrawn on its own clock: status and progress every 2 s, charts every
# 3 s (from this session's cache: only new rows are read), checkpoints and logs every 5 s.
@st.fragment(run_every=2)
def live() -> None:
    with factory() as session:
        run = runs.get_run(session, run_id)
        if run is None:
            st.warning("This run was deleted.")
            return
        stages = list(run.stages)
    st.html(views.heading_html(run.name))  # the user's text as typed: never Markdown, never a link
    common.alert("caption", f"run {run.id} · {run.spec.get('mode')} · {run.spec.get('model')} · "
                 f"created {views.age(run.created_at)} ago")
    status_line(run, stages)

    train_stage = next((x for x in stages if x.name == "train"), None)
    cache = _metric_cache(run_id, train_stage)
    frac, eta = views.train_eta(cache.train_points, train_stage.total_steps if train_stage else None)
    overall = views.run_progress(run)
    label = f"overall {int(overall * 100)}%"  # floor: 100% only when everything has finished
    live_stage = next((x for x in stages if x.status == StageStatus.RUNNING), None)
    if cache.train_points:
        eta_text = f" · ETA {views.fmt_duration(eta)}" if eta is not None and run.status == RunStatus.RUNNING else ""
        label += f" · training {int(frac * 100)}%" + eta_text
    elif live_stage is not None and live_stage.total_steps:
        label += f" · {live_stage.name} {int(views.stage_fraction(live_stage) * 100)}%"
    st.progress(overall, text=label)

    st.subheader("Stages")
    st.dataframe(pd.DataFrame(views.stage_rows(stages)), hide_index=True, width="stretch")
    data = views.prepare_summary(run.work_dir)
    if data:
        common.alert("warning" if data[1] else "caption", data[0])


@st.fragment(run_every=5)
def files() -> None:
    with factory() as session:
        run = runs.get_run(session, run_id)
        if run is None:
            return
        stages = list(run.stages)
        ckpts = metrics.checkpoints(session, run_id)
        step_ckpts = metrics.step_checkpoints(session, run_id)
        accepted = metrics.acceptance_records(session, run_id)
    st.subheader("Checkpoints")
    rows = views.checkpoint_rows(ckpts, step_ckpts, accepted, exists=lambda p: Path(p).exists())
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                     column_order=["epoch", "step", "kind", "val loss", "acceptance", "best", "on disk", "path"],
                     column_config={"acceptance": st.column_config.NumberColumn(
                         "acceptance", help="mean acceptance length measured at this step", format="%.3f")})
    else:
        st.caption("No checkpoint yet.")

    st.subheader("Logs")
    for x in stages:
        if x.log_path:
            with st.expander(f"{x.name} ({x.status})", expanded=x.status in (StageStatus.RUNNING, StageStatus.FAILED)):
                st.code(log_tail(x.log_path, lines=30) or "(empty)", language=None)


def chart_controls() -> tuple[str, float]:
    """The x axis and the smoothing every chart of the page uses (kept per session)."""
    c1, c2 = st.columns([2, 1])
    axis = c1.radio("x axis", list(views.X_AXES), horizontal=True, key="x_axis",
                    help="tokens: the tokens trained so far; wall time: minutes since the first record")
    weight = c2.slider("Smoothing", 0.0, 0.99, 0.6, 0.01, key="smoothing",
                       help="exponential moving average of each curve (the raw curve stays, faint); 0: none")
    return axis, float(weight)


def _steps_per_epoch(run, train_stage) -> float | None:
    epochs = (run.spec or {}).get("epochs")
    total = train_stage.total_steps if train_stage is not None else None
    return total / epochs if total and isinstance(epochs, int) and epochs > 0 else None


@st.fragment(run_every=3)
def charts() -> None:
    """The metric charts, training and validation apart. Each chart object is rebuilt only
    when new rows arrived or the axis or smoothing changed (kept per session with the data
    version), and each series is thinned to `views.MAX_POINTS`, so a refresh sends little and
    the browser redraws only what changed."""
    with factory() as session:
        run = runs.get_run(session, run_id)
    if run is None:
        return
    train_stage = next((x for x in run.stages if x.name == "train"), None)
    cache = _metric_cache(run_id, train_stage)
    st.subheader("Training metrics")
    axis, weight = chart_controls()
    built = st.session_state.setdefault("built_charts", {})
    key = (run_id, cache.key, cache.version, axis, weight)
    if built.get("key") != key:
        frame = cache.frame()
        train = frame[frame["type"] == "train"] if not frame.empty else frame
        per_epoch = _steps_per_epoch(run, train_stage)
        built["key"] = key
        built["charts"] = {
            kind: [charts_lib.metric_chart(f"{title} · {label}",
                                           views.chart_data(part, axis, weight, train=train, steps_per_epoch=per_epoch),
                                           axis, smoothed=weight > 0)
                   for title, part in views.split_frames(frame, kind)]
            for kind, label in (("train", "train"), ("val", "validation"))}
    if not built["charts"]["train"]:
        st.info("Metrics appear here as soon as training logs its first step.")
        return
    if axis == "tokens" and not any(r["metric"] == "tokens" for r in cache.rows[:50]):
        common.alert("caption", "This run's records carry no token counts (an older trainer): the tokens axis is empty.")
    for kind, heading in (("train", None), ("val", "Validation (at each epoch end)")):
        if not built["charts"][kind]:
            continue
        if heading:
            st.markdown(f"##### {heading}")
        cols = st.columns(2)
        for i, c in enumerate(built["charts"][kind]):
            cols[i % 2].altair_chart(c, width="stretch", key=f"chart_{kind}_{i}")
    acceptance_charts(axis, cache, _steps_per_epoch(run, train_stage))


def acceptance_charts(axis: str, cache: views.MetricCache, per_epoch: float | None) -> None:
    """The draft's acceptance measured while training (held-out prompts, exact speculative
    decoding): the mean acceptance length over training, and the per-position rates of one
    measurement (the latest, or the one the user picks: each checkpoint's step has one)."""
    with factory() as session:
        records = metrics.acceptance_records(session, run_id)
        ckpt_steps = {c.step for c in metrics.checkpoints(session, run_id)} | \
            {c.step for c in metrics.step_checkpoints(session, run_id)}
    if not records:
        return
    st.subheader("Acceptance (held-out prompts)")
    frame = cache.frame()
    train = frame[frame["type"] == "train"] if not frame.empty else frame
    curve = views.acceptance_curve(records)
    curve = curve.assign(x=views.x_values(curve.assign(ts=[r.ts for r in records]), axis, train, per_epoch))
    steps = [r.step for r in records]
    options = ["latest", *steps]
    if st.session_state.get("acceptance_step") not in options:
        st.session_state.pop("acceptance_step", None)
    left, right = st.columns(2)
    left.altair_chart(charts_lib.acceptance_curve_chart(curve, axis), width="stretch", key="acceptance_curve")
    picked = right.selectbox("Per-position rates at", options, key="acceptance_step",
                             format_func=lambda v: v if v == "latest" else
                             f"step {v}" + (" (checkpoint)" if v in ckpt_steps else ""))
    shown = records[-1] if picked == "latest" else next(r for r in records if r.step == picked)
    right.altair_chart(charts_lib.positions_chart(views.acceptance_positions(shown),
                                                  f"Acceptance rate per position (step {shown.step})"),
                       width="stretch", key="acceptance_positions")
    common.alert("caption", f"{shown.prompts} prompts, {shown.tokens} tokens generated in "
                 f"{shown.seconds:.1f}s at step {shown.step}")


live()
charts()
files()


@st.fragment(run_every=5)
def serving() -> None:
    serve_panel.render(factory, s, run_id)


serving()


def _all_records() -> list:
    with factory() as session:
        return [*metrics.step_records(session, run_id, None), *metrics.acceptance_records(session, run_id)]


def details() -> None:
    """What does not change while the run trains: its settings, the whole-run export, compare."""
    with factory() as session:
        run = runs.get_run(session, run_id)
        if run is None:
            return
    st.subheader("Hyperparameters")
    only = st.toggle("Only those changed from the defaults", key="hp_changed")
    rows = [r for r in views.hparam_rows(run.spec or {}) if r["changed"] or not only]
    st.dataframe(pd.DataFrame(rows, columns=["setting", "key", "value", "default", "changed"]), hide_index=True,
                 width="stretch", key="hparams")
    st.subheader("Export")
    c1, c2, c3 = st.columns(3)
    stem = f"run-{run_id}-metrics"
    # the files are built when clicked (a callable), from every record stored so far
    c1.download_button("Metrics as CSV", lambda: views.export_csv(_all_records()), file_name=f"{stem}.csv",
                       mime="text/csv", key="export_csv",
                       help="one row per train, val and acceptance record: step, epoch, time, every metric")
    c2.download_button("Metrics as JSONL", lambda: views.export_jsonl(_all_records()), file_name=f"{stem}.jsonl",
                       mime="application/jsonl", key="export_jsonl",
                       help="the trainer's metrics.jsonl records (train, val, acceptance), by step")
    common.page_link("pages/4_Compare.py", "Compare with other runs", "📊", {"runs": run_id}, where=c3)


details()
