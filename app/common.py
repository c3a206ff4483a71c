"""What every page shares: settings, the run store, the Celery app, the outbox dispatcher,
and the actions a user can take (submit, cancel, resume, delete, serve)."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from pathlib import Path

import streamlit as st

from runstore import open_store, runs
from runstore.settings import Settings
from speculators.config.run import RunSettings
from speculators.config.stages import pipeline_stages
from worker.spec import inside


def settings() -> Settings:
    s = Settings.from_env()
    s.ensure_dirs()
    return s


@st.cache_resource(show_spinner=False)
def _store(db_url: str):
    return open_store(db_url)


def store():
    return _store(settings().db_url)


@st.cache_resource(show_spinner=False)
def _celery(broker_url: str, backend: str):
    from worker.celery_app import make_celery

    return make_celery(settings())


def celery():
    s = settings()
    return _celery(s.broker_url, s.result_backend)


@st.cache_resource(show_spinner=False)
def _dispatcher(db_url: str, broker_url: str):
    from worker.dispatch import Dispatcher

    d = Dispatcher(store(), celery())
    d.start()
    return d


def ensure_dispatcher():
    """One background thread per dashboard process sends the outbox (e.g. runs submitted
    while Redis was down) as soon as the broker answers."""
    s = settings()
    return _dispatcher(s.db_url, s.broker_url)


def flush() -> str | None:
    """Send pending outbox messages now; returns the broker error, if any."""
    from worker.dispatch import flush_outbox

    _, err = flush_outbox(store(), celery())
    return err


def alert(kind: str, text: str, icon: str = "", where=st) -> None:
    """Show `text` as an alert (error, warning, info, success) or a caption, as plain text:
    nothing in it becomes a link, an image or formatting (see `views.alert_html`)."""
    from app.views import alert_html

    where.html(alert_html(kind, text, icon))


@st.cache_data(ttl=5, show_spinner=False)
def _broker_down(url: str) -> str | None:
    from worker.dispatch import probe_broker

    return probe_broker(url, timeout=0.5)


def broker_down() -> str | None:
    """Why the broker does not answer (a TCP connect with a short timeout, cached a few seconds
    so a page refreshing every 2 s costs nothing), or None when it does."""
    return _broker_down(settings().broker_url)


def broker_message(err: str) -> str:
    return (f"The task broker ({settings().broker_url}) is not reachable: {err.splitlines()[0][:200]}. "
            "Your request is saved and will be queued automatically when the broker is back.")


def submit(spec: RunSettings) -> tuple[str, str | None]:
    """Store the run and its start message in one transaction, then try to send it. A name
    another run has meanwhile taken raises `runstore.errors.NameTaken`."""
    s = settings()
    run_id = uuid.uuid4().hex[:12]
    work_dir = s.runs_root / run_id
    with store()() as session:
        runs.create_run(session, run_id=run_id, name=spec.name, spec=spec.to_dict(),
                        stages=pipeline_stages(spec), work_dir=str(work_dir), unique_name=True)
    return run_id, flush()


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def save_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded dataset under <data root>/uploads, named by content hash so two uploads
    never overwrite each other; the user's file name is reduced to safe characters."""
    s = settings()
    stem = _SAFE.sub("_", Path(name).name)[:80].strip("._") or "upload"
    if not stem.endswith(".jsonl"):
        stem += ".jsonl"
    digest = hashlib.sha256(data).hexdigest()[:12]
    dest = s.data_root / "uploads" / f"{digest}-{stem}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        tmp = dest.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return dest


def delete_files(work_dir: str) -> bool:
    """Remove a run's work directory, only when it lies inside the runs root."""
    s = settings()
    p = Path(work_dir)
    if not p.exists() or not inside(p, s.runs_root) or p.resolve() == s.runs_root.resolve():
        return False
    shutil.rmtree(p)
    return True


def page_link(page: str, label: str, icon: str | None = None, query_params: dict | None = None, where=st) -> None:
    """`st.page_link` to a file under app/pages. When a page runs on its own (AppTest, or
    `streamlit run app/pages/X.py`) Streamlit cannot resolve sibling pages, so fall back to a
    plain relative link with the same URL."""
    from streamlit.errors import StreamlitPageNotFoundError

    try:
        where.page_link(page, label=label, icon=icon, query_params=query_params)
    except StreamlitPageNotFoundError:
        url = Path(page).stem.split("_", 1)[-1]
        if query_params:
            url += "?" + "&".join(f"{k}={v}" for k, v in query_params.items())
        where.markdown(f"{icon or ''} [{label}]({url})")


def tiny_model_notice(where=st) -> None:
    """While the local mode builds the tiny verifier in the background: its latest output
    line and the time elapsed (the form's default model appears when it is done)."""
    from app.views import fmt_duration
    from worker.tinybuild import read_status

    model = Path(settings().default_model)
    if not model.is_absolute():
        return
    status = read_status(model)
    if status is None or status.state == "done":
        return
    if status.state == "building":
        alert("info", f"Building the tiny CPU verifier (first start only), {fmt_duration(status.elapsed_s)} "
              f"elapsed: {status.last_line or 'starting'}. Runs on other models can be launched meanwhile.",
              icon="⏳", where=where)
    else:
        alert("error", f"Building the tiny CPU verifier failed after {fmt_duration(status.elapsed_s)}: "
              f"{status.error or status.last_line}. Restart python -m worker.local to try again.", where=where)
