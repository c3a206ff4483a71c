"""The run page's "Serve in vLLM" panel: serve the best checkpoint, say truthfully whether
it is up (the deployment's own server answering, not whatever holds the port), how to call
it (model name, curl, API key), why it failed (the log's cause line, then its tail), and
the acceptance metrics read from its Prometheus /metrics beside the acceptance measured while
training at the served checkpoint's step."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts, common, views
from runstore import deployments, metrics, runs
from runstore.models import DeploymentStatus
from runstore.settings import Settings
from worker import serving
from worker.procs import log_tail

LIVE = ("requested", "starting", "up", "stopping")


def acceptance(endpoint: str) -> dict | None:
    try:
        from speculators.vllm.metrics import report_from_metrics, scrape

        return report_from_metrics(scrape(endpoint, timeout_s=3))
    except Exception as exc:  # no traffic yet, or the server is gone
        return {"error": str(exc)}


def state_text(dep, s: Settings) -> tuple[str, bool]:
    """("up, healthy", True) only when the deployment's server answers with its own model
    name; otherwise the status and what is wrong."""
    if dep.status != DeploymentStatus.UP:
        return dep.status, False
    verdict = serving.check_endpoint(dep.endpoint, serving.served_name(dep.run_id, dep.id), s.vllm_api_key or None)
    return f"up, {verdict.text}", verdict.healthy


def render(factory, s: Settings, run_id: str) -> None:
    st.subheader("Serve in vLLM")
    with factory() as session:
        best = metrics.best_checkpoint(session, run_id)
        dep = deployments.latest_deployment(session, run_id, kind="draft")
        run = runs.get_run(session, run_id)
    if run is None:
        return
    live_dep = dep is not None and dep.status in LIVE
    c1, c2, c3 = st.columns([1, 1, 2])
    kv = c2.number_input("CPU KV cache (GiB)", min_value=0, max_value=1024, value=int(s.vllm_kv_cache_gib), step=1,
                         key="kv_cache_gib", disabled=live_dep,
                         help="vLLM on a machine without a GPU: memory for its KV cache "
                              "(VLLM_CPU_KVCACHE_SPACE). 0 = chosen from the free memory: a quarter of what "
                              "the weights and 2 GiB leave, 1-32 GiB. Ignored on a GPU.")
    if c1.button("Serve best checkpoint", type="primary", disabled=best is None or live_dep, key="btn_serve",
                 help=None if best else "available once training has saved a checkpoint"):
        with factory() as session:
            deployments.request_deployment(session, kind="draft", model_path=best.path, run_id=run_id,
                                           port=s.vllm_port, endpoint=f"http://{s.vllm_host}:{s.vllm_port}",
                                           extra={"kv_cache_gib": int(kv) or None})
        err = common.flush()
        if err:
            st.warning(common.broker_message(err))
        st.rerun()
    if dep is None:
        c3.caption("Not served." if best else "No checkpoint yet.")
        return
    public = f"http://{s.vllm_public_host}:{dep.port}"
    state, up = state_text(dep, s)
    # plain text (common.alert): the state may quote a foreign server's model ids, the error a log line
    kind = "success" if up else "error" if dep.status == DeploymentStatus.FAILED else "info"
    common.alert(kind, f"{state} · endpoint {public}/v1 · checkpoint {dep.model_path}", where=c3)
    if dep.error:
        common.alert("error", f"Error: {dep.error}")  # the log's cause line first; the log tail is below
    if live_dep and st.button("Stop server", key="btn_stop"):
        with factory() as session:
            deployments.request_stop(session, dep.id)
        common.flush()
        st.rerun()
    if dep.status in (DeploymentStatus.STARTING, DeploymentStatus.UP):
        name = serving.served_name(dep.run_id, dep.id)
        key_needed = bool(s.vllm_api_key)
        st.text(f"Model name to send: {name}")
        st.text("API key: required (send SPEC_VLLM_API_KEY as a Bearer token)" if key_needed
                else "API key: none needed")
        st.code(serving.curl_command(public, name, key_needed), language="bash")
        rec = serving.read_record(s.home, dep.id)
        if rec is not None and rec.kv_cache:
            st.caption(f"CPU KV cache: {rec.kv_cache} (the server log's `KV cache:` line says what was used)")
    if up:
        report = acceptance(dep.endpoint)
        if report and "error" not in report:
            with factory() as session:
                trained = views.served_training_acceptance(
                    dep.model_path, metrics.checkpoints(session, run_id), metrics.step_checkpoints(session, run_id),
                    metrics.acceptance_records(session, run_id))
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Drafted tokens", report["num_draft_tokens"])
            m2.metric("Accepted tokens", report["num_accepted_tokens"])
            mean, note = views.acceptance_summary(report)
            m3.metric("Mean acceptance length", mean, help="live: from the server's /metrics counters, over "
                      "every request it has served")
            m4.metric("At training time", f"{trained.mean_acceptance_length:.2f}" if trained else "n/a",
                      help="measured while training on the run's held-out prompts, at this checkpoint's step "
                           "(or the latest measurement before it)")
            if trained:
                st.caption(f"Training-time figure: step {trained.step}, {trained.prompts} held-out prompts, "
                           f"{trained.tokens} tokens; the live figure counts the requests sent to this server.")
            if note:
                st.caption(note)
            rows = views.acceptance_rows(report)
            if rows:
                live = pd.DataFrame(rows).assign(source="live (served)")
                if trained:
                    live = pd.concat([live, views.acceptance_positions(trained).assign(source="at training time")])
                st.altair_chart(charts.positions_compare_chart(live), width="stretch", key="served_positions")
            with factory() as session:
                deployments.update_deployment(session, dep.id, acceptance=report)
        elif report:
            st.caption(f"Acceptance metrics: {report['error']}")
    if dep.log_path:
        with st.expander("Server log", expanded=dep.status == DeploymentStatus.FAILED):
            st.code(log_tail(dep.log_path, lines=30) or "(empty)", language=None)
