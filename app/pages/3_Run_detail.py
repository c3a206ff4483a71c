"""One run: stages and timings, live metric charts (the acceptance measured while training
included), progress and ETA, logs, checkpoints, and serving the best checkpoint in vLLM with its acceptance metrics."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import altair as alt
import pandas as pd
import streamlit as st

from app import common, serve_panel, views
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


def chart(title: str, df: pd.DataFrame) -> alt.Chart:
    # losses fall by orders of magnitude: a log axis keeps the late curve readable
    log = title == "Loss" and bool((df["value"] > 0).all())
    scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    return (alt.Chart(df, title=title + (" (log)" if log else "")).mark_line(point=len(df) < 60)
            .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None, scale=scale),
                    color=alt.Color("series:N", title=None), tooltip=["series", "step", "epoch", "value"])
            .properties(height=220))


def _metric_cache(run_id: str, train_stage) -> views.MetricCache:
    """This session's chart data for the run, brought up to date with the rows written since
    the last refresh (only those are read)."""
    caches = st.session_state.setdefault("metric_caches", {})
    cache = caches.setdefault(run_id, views.MetricCache())
    attempt = (train_stage.attempts, train_stage.started_at) if train_stage is not None else (0, None)
    cache.reset_for(attempt)
    with factory() as session:
        cache.add(metrics.step_records(session, run_id, cache.after()))
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
    st.subheader("Checkpoints")
    if ckpts:
        st.dataframe(pd.DataFrame([{"epoch": c.epoch, "step": c.step, "val loss": c.val_loss,
                                    "best": "★" if c.is_best else "", "path": c.path} for c in ckpts]),
                     hide_index=True, width="stretch")
    else:
        st.caption("No checkpoint yet.")

    st.subheader("Logs")
    for x in stages:
        if x.log_path:
            with st.expander(f"{x.name} ({x.status})", expanded=x.status in (StageStatus.RUNNING, StageStatus.FAILED)):
                st.code(log_tail(x.log_path, lines=30) or "(empty)", language=None)


@st.fragment(run_every=3)
def charts() -> None:
    """The metric charts. Each chart object is rebuilt only when new rows arrived (kept per
    session with the data version), and each series is thinned to `views.MAX_POINTS`, so a
    refresh sends little and the browser redraws only what changed."""
    with factory() as session:
        run = runs.get_run(session, run_id)
    if run is None:
        return
    cache = _metric_cache(run_id, next((x for x in run.stages if x.name == "train"), None))
    st.subheader("Training metrics")
    built = st.session_state.setdefault("built_charts", {})
    key = (run_id, cache.key, cache.version)
    if built.get("key") != key:
        built["key"] = key
        built["charts"] = [chart(title, part) for title, part in views.chart_frames(cache.frame())]
    if not built["charts"]:
        st.info("Metrics appear here as soon as training logs its first step.")
        return
    cols = st.columns(2)
    for i, c in enumerate(built["charts"]):
        cols[i % 2].altair_chart(c, width="stretch", key=f"chart_{i}")
    acceptance_charts()


def acceptance_charts() -> None:
    """The draft's acceptance measured while training (held-out prompts, exact speculative
    decoding): the mean acceptance length over steps and the latest per-position rates."""
    with factory() as session:
        records = metrics.acceptance_records(session, run_id)
    if not records:
        return
    st.subheader("Acceptance (held-out prompts)")
    latest = records[-1]
    curve = views.acceptance_curve(records)
    left, right = st.columns(2)
    left.altair_chart(
        alt.Chart(curve, title="Mean acceptance length").mark_line(point=len(curve) < 60)
        .encode(x=alt.X("step:Q", title="step"), y=alt.Y("mean acceptance length:Q", title=None,
                                                          scale=alt.Scale(zero=False)),
                tooltip=["step", "epoch", "mean acceptance length", "seconds"])
        .properties(height=220), width="stretch", key="acceptance_curve")
    right.altair_chart(
        alt.Chart(views.acceptance_positions(latest), title=f"Acceptance rate per position (step {latest.step})")
        .mark_bar().encode(x=alt.X("position:O"), y=alt.Y("acceptance rate:Q", scale=alt.Scale(domain=[0, 1])),
                           tooltip=["position", "acceptance rate"])
        .properties(height=220), width="stretch", key="acceptance_positions")
    common.alert("caption", f"{latest.prompts} prompts, {latest.tokens} tokens generated in "
                 f"{latest.seconds:.1f}s at step {latest.step}")


live()
charts()
files()


@st.fragment(run_every=5)
def serving() -> None:
    serve_panel.render(factory, s, run_id)


serving()
