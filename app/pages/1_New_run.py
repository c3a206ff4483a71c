"""New run: the form. Every field is validated before anything is stored; each error is
shown under its field."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st

from app import common
from runstore import errors, runs
from speculators.config.base import choices_of, unwrap_optional
from speculators.config.run import BUILTIN_DATASETS, RunSettings, form_defaults
from worker.spec import validate_spec

st.set_page_config(page_title="New run", page_icon="🚀", layout="wide")
common.ensure_dispatcher()
s = common.settings()
state = st.session_state
state.setdefault("form_errors", {})
DEFAULTS = form_defaults(cpu_only=s.max_gpus == 0)
# Fields rendered from the run schema (speculators.config.run): label, help, default and the
# checks behind each error come from there; `dataset` has its own chooser below.
LEFT = ["name", "model", "seq_length", "max_samples", "layer_ids", "regenerate"]
REGEN = ["regenerate_backend", "regenerate_max_tokens", "regenerate_temperature"]
RIGHT = ["draft_vocab_size", "epochs", "lr", "ttt_steps", "num_layers", "mode"]
ADVANCED = ["nodes", "batch_size", "seed", "algorithm", "optimizer", "loss", "gradient_checkpointing",
            "freeze_lm_head", "hidden_states_dtype"]
# acceptance measured while training (speculators train's --eval-* flags) and the checkpoint choice
ACCEPTANCE = ["eval_prompts", "eval_every_steps", "eval_max_tokens", "eval_data", "best_by", "checkpoint_every_steps"]
PLACEHOLDERS = {"layer_ids": "default: 2, n/2, n-3", "name": "",
                "eval_data": "default: the validation rows of the training data",
                "vllm_endpoint": "http://host-a:8000\nhttp://host-b:8000 (one per line; empty: the controller starts one)"}
MULTILINE = {"vllm_endpoint"}  # several hidden-state servers, one URL per line


def key(name: str) -> str:
    return f"f_{name}"


def field_error(name: str) -> None:
    msg = state["form_errors"].get(name)
    if msg:
        common.alert("error", msg, icon="⚠️")  # plain text: messages quote what was typed


def initial(name: str):
    if name == "name":
        return f"run-{datetime.now():%Y%m%d-%H%M%S}"
    if name == "model":
        return s.default_model
    if name == "gpus":
        return min(1, s.max_gpus)
    return DEFAULTS.get(name)


def widget(name: str) -> None:
    """One schema field as a widget. Numbers and lists are text boxes parsed by the schema:
    what is typed is what is checked and stored, and a value out of bounds gets a message
    (a number box would clamp it or silently keep its previous value)."""
    info = RunSettings.model_fields[name]
    label, help_text, value = info.title or name, info.description or None, initial(name)
    inner, _ = unwrap_optional(info.annotation)
    choices = choices_of(info.annotation)
    if choices:
        st.radio(label, list(choices), index=list(choices).index(value), key=key(name), horizontal=True,
                 help=help_text)
    elif inner is bool:
        st.checkbox(label, value=bool(value), key=key(name), help=help_text)
    elif inner is int:
        st.text_input(label, value=str(int(value)), key=key(name), help=help_text)
    elif inner is float:
        st.text_input(label, value=repr(float(value)), key=key(name), help=help_text)
    elif name in MULTILINE:
        st.text_area(label, value="\n".join(str(value or "").split(",")), key=key(name), help=help_text,
                     placeholder=PLACEHOLDERS.get(name, ""), height=80)
    elif isinstance(value, list):
        st.text_input(label, value=",".join(map(str, value)), key=key(name), help=help_text,
                      placeholder=PLACEHOLDERS.get(name, ""))
    else:
        st.text_input(label, value=str(value or ""), key=key(name), help=help_text,
                      placeholder=PLACEHOLDERS.get(name, ""))
    field_error(name)


def _submit() -> None:
    source = state["f_source"]
    dataset = ""
    if source == "Built-in":
        dataset = state["f_builtin"]
    elif source == "Upload .jsonl":
        up = state.get("f_upload")
        dataset = str(common.save_upload(up.name, up.getvalue())) if up is not None else ""
    else:
        dataset = state["f_path"]
    raw = {name: state[key(name)] for name in RunSettings.model_fields if key(name) in state}
    raw["dataset"] = dataset
    if state.get(key("mode")) == "offline":
        raw.pop("vllm_endpoint", None)
    with common.store()() as session:
        taken = runs.run_names(session)
    spec, errs = validate_spec(raw, s, names_taken=taken)
    state["form_errors"] = errs
    state["submitted"] = None
    if spec is None:
        return
    try:
        run_id, broker_err = common.submit(spec)
    except errors.NameTaken as exc:  # another tab or client took the name meanwhile
        state["form_errors"] = {"name": str(exc)}
        return
    state["submitted"] = {"run_id": run_id, "name": spec.name, "broker_error": broker_err}


st.title("New run")
common.tiny_model_notice()
if state.get("submitted"):
    sub = state["submitted"]
    common.alert("success", f"Run {sub['run_id']} saved: {sub['name']}")  # the user's text, never Markdown
    if sub["broker_error"]:
        common.alert("warning", common.broker_message(sub["broker_error"]))
    common.page_link("pages/3_Run_detail.py", "Open the run", "📈", {"run": sub["run_id"]})

left, right = st.columns(2)
with left:
    st.subheader("Model and data")
    widget("name")
    widget("model")
    st.radio("Dataset", ["Built-in", "Upload .jsonl", "File under data root"], key="f_source", horizontal=True)
    if state["f_source"] == "Built-in":
        st.selectbox("Built-in dataset", BUILTIN_DATASETS, key="f_builtin")
    elif state["f_source"] == "Upload .jsonl":
        st.file_uploader("Conversations (.jsonl)", type=["jsonl"], key="f_upload")
    else:
        st.text_input("Path (relative to the data root)", key="f_path", help=f"data root: {s.data_root}")
    field_error("dataset")
    for name in LEFT[2:]:
        widget(name)
    if state.get(key("regenerate")):
        for name in REGEN:
            widget(name)
with right:
    st.subheader("Draft and training")
    for name in RIGHT:
        widget(name)
    if state[key("mode")] != "offline":
        widget("vllm_endpoint")
    widget("gpus")
    with st.expander("Acceptance and checkpoints",
                     expanded=any(n in state["form_errors"] for n in ACCEPTANCE)):
        for name in ACCEPTANCE:
            widget(name)
    with st.expander("Advanced", expanded=any(n in state["form_errors"] for n in ADVANCED)):
        for name in ADVANCED:
            widget(name)

st.button("Launch run", type="primary", on_click=_submit)
if state["form_errors"]:
    common.alert("error", f"Fix {len(state['form_errors'])} field(s) above before launching.")
