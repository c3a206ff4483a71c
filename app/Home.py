"""Dashboard entry page: `streamlit run app/Home.py`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `app`, `worker`, `runstore` importable

import streamlit as st

from app import common
from runstore import runs

st.set_page_config(page_title="Speculators", page_icon="⚡", layout="wide")
common.ensure_dispatcher()
s = common.settings()

st.title("Speculators: EAGLE-3 draft training")


@st.fragment(run_every=3)
def _tiny_model() -> None:
    common.tiny_model_notice()


_tiny_model()
st.write("Train a speculative-decoding draft model for a verifier, watch it learn, and serve the "
         "best checkpoint in vLLM.")

with common.store()() as session:
    all_runs = runs.list_runs(session)
counts: dict[str, int] = {}
for r in all_runs:
    counts[r.status] = counts.get(r.status, 0) + 1
cols = st.columns(4)
for col, key in zip(cols, ("running", "queued", "succeeded", "failed")):
    col.metric(key.capitalize(), counts.get(key, 0))

st.page_link("pages/1_New_run.py", label="Launch a new run", icon="🚀")
st.page_link("pages/2_Runs.py", label="All runs", icon="📋")
st.page_link("pages/4_Compare.py", label="Compare runs", icon="📊")

with st.expander("Installation"):
    st.write({"database": s.db_url, "broker": s.broker_url, "data root": str(s.data_root),
              "runs root": str(s.runs_root), "default model": s.default_model, "GPUs offered": s.max_gpus})
