"""Runs: the table (with each run's best validation loss, best acceptance and duration), a link
to compare runs, and cancel / retry / resume / delete for the selected run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd
import streamlit as st

from app import common, views
from runstore import errors, metrics, runs
from runstore.models import ACTIVE_RUN, RESUMABLE_RUN, StageStatus

st.set_page_config(page_title="Runs", page_icon="📋", layout="wide")
common.ensure_dispatcher()
state = st.session_state
factory = common.store()

st.title("Runs")


def _act(fn, *args, ok: str) -> None:
    try:
        with factory() as session:
            fn(session, *args)
    except errors.StoreError as exc:
        state["runs_msg"] = ("error", str(exc))
        return
    err = common.flush()
    state["runs_msg"] = ("warning", common.broker_message(err)) if err else ("success", ok)


@st.fragment(run_every=3)
def runs_table() -> None:
    with factory() as session:
        listed = runs.list_runs(session)
        found = metrics.score_records(session, [r.id for r in listed])
    rows = views.runs_rows(listed, scores={rid: views.run_scores(*recs) for rid, recs in found.items()})
    down = common.broker_down() if any(r["status"] in ("queued", "running", "waiting") for r in rows) else None
    if down:
        common.alert("error", f"broker unreachable: {common.settings().broker_url} ({down}). Waiting runs are "
                     "queued as soon as it answers again.")
    if not rows:
        st.info("No runs yet.")
        common.page_link("pages/1_New_run.py", "Launch the first run", "🚀")
        return
    st.dataframe(
        pd.DataFrame(rows), hide_index=True, width="stretch",
        column_order=["name", "status", "stage", "progress", "best val loss", "best acceptance", "duration", "age",
                      "mode", "error", "detail"],
        column_config={
            "best val loss": st.column_config.NumberColumn("best val loss", format="%.4f",
                                                           help="lowest validation loss of the run"),
            "best acceptance": st.column_config.NumberColumn(
                "best acceptance", format="%.3f", help="highest mean acceptance length measured while training"),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "detail": st.column_config.LinkColumn("detail", display_text="open"),
        },
    )


runs_table()
common.page_link("pages/4_Compare.py", "Compare runs: overlay loss, accuracy and acceptance", "📊")

with factory() as session:
    all_runs = runs.list_runs(session)
if all_runs:
    labels = {r.id: f"{r.name} ({r.id}, {r.status})" for r in all_runs}
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="runs_selected")
    run = next(r for r in all_runs if r.id == run_id)
    c1, c2, c3, c4, c5 = st.columns(5)
    if c1.button("Cancel", disabled=run.status not in ACTIVE_RUN, key="btn_cancel"):
        _act(runs.request_cancel, run.id, ok="Cancel requested; the stage stops within seconds.")
        st.rerun()
    failed = next((x.name for x in run.stages if x.status == StageStatus.FAILED), None)
    if c2.button(f"Retry {failed or 'failed stage'}", disabled=failed is None, key="btn_retry"):
        _act(lambda sess, rid: runs.resume_run(sess, rid, from_stage=failed), run.id,
             ok=f"Stage {failed} queued again.")
        st.rerun()
    if c3.button("Resume", disabled=run.status not in RESUMABLE_RUN, key="btn_resume",
                 help="continue from the first unfinished stage; training resumes from its last checkpoint"):
        _act(runs.resume_run, run.id, ok="Run queued; it resumes from its first unfinished stage.")
        st.rerun()
    common.page_link("pages/3_Run_detail.py", "Details", "📈", {"run": run.id}, where=c4)
    if c5.button("Delete…", disabled=run.status in ACTIVE_RUN, key="btn_delete"):
        state["confirm_delete"] = run.id

    if state.get("confirm_delete") == run.id:
        with st.container(border=True):
            st.text(f"{run.name} ({run.id})")  # the user's text, never Markdown
            st.warning("Delete this run from the dashboard? Its metrics and "
                       f"stage history go. Files in `{run.work_dir}` are kept unless you tick the box.")
            also_files = st.checkbox(f"Also delete its files (checkpoints, data) in {run.work_dir}",
                                     key="delete_files")
            d1, d2 = st.columns(2)
            if d1.button("Yes, delete", type="primary", key="btn_delete_confirm"):
                try:
                    with factory() as session:
                        work_dir = runs.delete_run(session, run.id)
                    removed = common.delete_files(work_dir) if also_files else False
                    state["runs_msg"] = ("success", f"Run {run.id} deleted; files "
                                         + ("deleted." if removed else f"kept in {work_dir}."))
                except errors.StoreError as exc:
                    state["runs_msg"] = ("error", str(exc))
                state.pop("confirm_delete", None)
                st.rerun()
            if d2.button("Keep it", key="btn_delete_keep"):
                state.pop("confirm_delete", None)
                st.rerun()

msg = state.pop("runs_msg", None)
if msg:
    common.alert(msg[0], msg[1])
