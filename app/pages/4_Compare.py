"""Compare runs: choose several, see their best figures and duration side by side, overlay
any metric (loss, accuracies, the acceptance measured while training) on one axis with
smoothing, and the settings that differ."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd
import streamlit as st

from app import charts, common, metric_feed, views
from runstore import metrics, runs

st.set_page_config(page_title="Compare runs", page_icon="📊", layout="wide")
common.ensure_dispatcher()
factory = common.store()
state = st.session_state

st.title("Compare runs")
with factory() as session:
    all_runs = runs.list_runs(session)
if not all_runs:
    st.info("No runs yet.")
    common.page_link("pages/1_New_run.py", "Launch a run", "🚀")
    st.stop()
labels = views.run_labels(all_runs)
ids = [r.id for r in all_runs]
if "compare_runs" not in state:
    asked = [x for x in (st.query_params.get("runs") or "").split(",") if x in ids]
    state["compare_runs"] = asked or ids[:3]
chosen = st.multiselect("Runs", ids, key="compare_runs", format_func=labels.get,
                        help="the newest runs first; the page's address keeps the choice")
st.query_params["runs"] = ",".join(chosen)
if not chosen:
    st.info("Choose one or more runs.")
    st.stop()


@st.fragment(run_every=5)
def compared() -> None:
    with factory() as session:
        picked = [r for r in runs.list_runs(session) if r.id in chosen]
        found = metrics.score_records(session, [r.id for r in picked])
        caches = state.setdefault("compare_caches", {})  # per run: only rows newer than the last refresh are read
        for r in picked:
            metric_feed.refresh(caches.setdefault(r.id, views.MetricCache()), session, r.id)
        long = {labels[r.id]: caches[r.id].frame() for r in picked}
        accepted = {labels[r.id]: found[r.id][1] for r in picked}
    scores = {rid: views.run_scores(*recs) for rid, recs in found.items()}
    st.dataframe(pd.DataFrame(views.compare_rows(picked, labels, scores)), hide_index=True, width="stretch",
                 key="compare_table",
                 column_config={"best val loss": st.column_config.NumberColumn(format="%.4f"),
                                "best acceptance": st.column_config.NumberColumn(format="%.3f"),
                                "detail": st.column_config.LinkColumn("detail", display_text="open")})
    offered = views.compare_metrics(long, any(accepted.values()))
    if not offered:
        st.info("None of these runs has logged a metric yet.")
        return
    default = [m for m in ("loss", "full_acc_0", views.ACCEPTANCE_METRIC) if m in offered]
    state["compare_metrics"] = [m for m in state.get("compare_metrics", default) if m in offered]
    c1, c2, c3 = st.columns([2, 2, 1])
    wanted = c1.multiselect("Metrics", offered, key="compare_metrics")
    axis = c2.radio("x axis", list(views.X_AXES), horizontal=True, key="compare_axis")
    weight = float(c3.slider("Smoothing", 0.0, 0.99, 0.6, 0.01, key="compare_smoothing"))
    cols = st.columns(2)
    for i, metric in enumerate(wanted):
        df = views.compare_frame(long, accepted, metric, axis, weight)
        if df.empty:
            continue
        log = metric.startswith("loss") and bool((df["value"] > 0).all())
        cols[i % 2].altair_chart(charts.line_chart(df, metric, axis=axis, smoothed=weight > 0, log=log,
                                                   legend_columns=1),
                                 width="stretch", key=f"compare_chart_{metric}")


compared()

st.subheader("Settings")
only = st.toggle("Only the settings that differ", value=True, key="compare_differing")
with factory() as session:
    specs = {labels[r.id]: r.spec or {} for r in runs.list_runs(session) if r.id in chosen}
st.dataframe(views.hparam_compare(specs, only_differing=only), hide_index=True, width="stretch",
             key="compare_settings")
