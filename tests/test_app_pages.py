"""Dashboard pages through Streamlit's AppTest: form validation next to the fields, submit
with the broker down (kept in the outbox), the runs table and its actions, the run page's
live charts, checkpoints and the serve button with acceptance metrics."""

from __future__ import annotations

import html
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from runstore import deployments, errors, metrics, open_store, outbox, runs, stages
from speculators.config.run import form_defaults
from tests.support.metric_reads import count_step_reads

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "app" / "pages"


@pytest.fixture()
def home(tmp_path, spec_home):
    s = spec_home(tmp_path, BROKER_URL="redis://127.0.0.1:1/0", MAX_GPUS=0)  # broker down unless a test says otherwise
    model = s.models_root / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 8, "vocab_size": 512}))
    chat = '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n'
    (s.data_root / "chats.jsonl").write_text(chat * form_defaults(cpu_only=True)["max_samples"])
    return s


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(PAGES / name), default_timeout=30)
    return at.run()


def _alerts(at: AppTest, kind: str) -> list[str]:
    """The texts of the plain-text alerts (`app.common.alert`) of one kind, as shown."""
    out = []
    for el in at.get("html"):
        m = re.fullmatch(r'<div data-spec-alert="(\w+)"[^>]*>(.*)</div>', el.value, re.S)
        if m and m.group(1) == kind:
            assert "<" not in m.group(2)  # escaped: no tag of the user's inside
            out.append(html.unescape(m.group(2)))
    return out


def _errors(at: AppTest) -> list[str]:
    return _alerts(at, "error") + [e.value for e in at.error]


def test_form_shows_each_error_under_its_field(home):
    at = _page("1_New_run.py")
    assert not at.exception
    at.text_input(key="f_name").set_value("")
    at.text_input(key="f_layer_ids").set_value("2,99")
    at.text_input(key="f_seq_length").set_value("3")
    at.text_input(key="f_lr").set_value("fast")
    at.radio(key="f_source").set_value("File under data root").run()
    at.text_input(key="f_path").set_value("../../etc/passwd.jsonl")
    at.button[0].click().run()
    errs = _errors(at)
    assert any("give the run a name" in e for e in errs)
    assert any("in [0, 8]" in e for e in errs)
    assert any("between 16 and" in e for e in errs)
    assert any("must be a number" in e for e in errs)
    assert any("inside the data root" in e for e in errs)
    # each error sits right after its own widget in the page
    flat = [getattr(el, "label", None) or getattr(el, "value", None) for el in at.main]
    idx = next(i for i, v in enumerate(flat) if isinstance(v, str) and "inside the data root" in v)
    assert flat[idx - 1].startswith("Path (relative to the data root)")
    with open_store(home.db_url)() as s:
        assert runs.list_runs(s) == []  # nothing stored


def test_submit_with_broker_down_keeps_the_run(home):
    at = _page("1_New_run.py")
    at.text_input(key="f_name").set_value("a; rm -rf ~ $(reboot)")
    at.radio(key="f_source").set_value("File under data root").run()
    at.text_input(key="f_path").set_value("chats.jsonl")
    at.button[0].click().run()
    assert _errors(at) == []
    assert any("saved" in x for x in _alerts(at, "success"))
    assert any("not reachable" in w and "queued automatically" in w for w in _alerts(at, "warning"))
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
        assert run.name == "a; rm -rf ~ $(reboot)" and run.status == "queued"
        assert run.spec["dataset"] == str((home.data_root / "chats.jsonl").resolve())
        (msg,) = outbox.pending(s)
        assert msg.payload["run_id"] == run.id and msg.last_error


class _HealthOnly(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's hook
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_form_takes_several_verifier_urls_and_a_node_count(home):
    """One URL per line: each is checked (the dead one named under the box), all are stored,
    with the node count from the Advanced section."""
    import socket

    good = ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=good.serve_forever, daemon=True).start()
    dead = socket.socket()  # bound, never listening: connections to it are refused at once
    dead.bind(("127.0.0.1", 0))
    good_url, dead_url = f"http://127.0.0.1:{good.server_port}", f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        at = _page("1_New_run.py")
        at.radio(key="f_mode").set_value("online").run()
        at.text_area(key="f_vllm_endpoint").set_value(f"{good_url}\n{dead_url}")
        at.text_input(key="f_nodes").set_value("2")
        at.radio(key="f_source").set_value("File under data root").run()
        at.text_input(key="f_path").set_value("chats.jsonl")
        at.button[0].click().run()
        errs = _errors(at)
        assert any(f"1 of 2 servers do not answer: cannot reach {dead_url}/health" in e for e in errs), errs
        assert not any(good_url + "/health" in e for e in errs)
        flat = [getattr(el, "label", None) or getattr(el, "value", None) for el in at.main]
        idx = next(i for i, v in enumerate(flat) if isinstance(v, str) and "1 of 2 servers" in v)
        assert flat[idx - 1].startswith("vLLM verifier URL(s)")  # under its own box
        second = good_url.replace("127.0.0.1", "localhost")
        at.text_area(key="f_vllm_endpoint").set_value(f"{good_url}\n{second}\n")
        at.button[0].click().run()
        assert _errors(at) == []
        with open_store(home.db_url)() as s:
            (run,) = runs.list_runs(s)
            assert run.spec["vllm_endpoint"] == f"{good_url},{second}" and run.spec["nodes"] == 2
            assert outbox.pending(s)[0].payload["nodes"] == 2
    finally:
        good.shutdown()
        good.server_close()
        dead.close()


def _seed_run(home, run_id="r1", status="running", with_metrics=True, spec=None):
    factory = open_store(home.db_url)
    with factory() as s:
        runs.create_run(s, run_id=run_id, name=f"seeded {run_id}", spec=spec or {"mode": "offline", "model": "m"},
                        stages=["prepare", "vocab", "datagen", "train"], work_dir=str(home.runs_root / run_id))
        for msg in outbox.pending(s):
            outbox.mark_sent(s, msg.id)
        for name in ("prepare", "vocab", "datagen"):
            stages.start_stage(s, run_id, name, worker="w", log_path=str(home.runs_root / run_id / f"{name}.log"))
            stages.finish_stage(s, run_id, name, "succeeded")
        for msg in outbox.pending(s):  # the next-stage messages a worker would have sent
            outbox.mark_sent(s, msg.id)
        log = home.runs_root / run_id / "train.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # a coloured line (a child run with FORCE_COLOR): the log view shows it plain
        log.write_text("\x1b[2;36m[09:00:01]\x1b[0m \x1b[34mINFO    \x1b[0m epoch 0 step 3 loss 1.23\n")
        st = stages.start_stage(s, run_id, "train", worker="w", log_path=str(log))
        if with_metrics:
            recs = [{"type": "start", "ts": 100.0, "total_steps": 10}]
            for step in range(1, 5):
                recs.append({"type": "train", "ts": 100.0 + step, "epoch": 0, "step": step, "total_steps": 10,
                             "metrics": {"loss": 2.0 / step, "loss_0": 1.0 / step, "full_acc_0": 0.1 * step,
                                         "cond_acc_0": 0.2 * step, "step_acc_0": 0.1 * step, "lr": 1e-3,
                                         "tokens_per_s": 1000.0}})
            recs.append({"type": "val", "ts": 105.0, "epoch": 0, "step": 4,
                         "metrics": {"loss": 0.7, "tokens_per_s": 2000.0}})
            recs.append({"type": "checkpoint", "ts": 105.5, "epoch": 0, "step": 4,
                         "path": str(home.runs_root / run_id / "checkpoints" / "0"), "val_loss": 0.7, "is_best": True})
            metrics.ingest_records(s, run_id, recs, stage_id=st.id)
        if status != "running":
            stages.finish_stage(s, run_id, "train", status, "boom" if status == "failed" else None)
    return factory


def test_runs_table_and_actions(home):
    factory = _seed_run(home, "r1", status="failed")
    _seed_run(home, "r2")
    at = _page("2_Runs.py")
    assert not at.exception
    df = at.dataframe[0].value
    assert set(df["run"]) == {"r1", "r2"}
    row = df[df["run"] == "r1"].iloc[0]
    assert row["status"] == "failed" and row["progress"] == pytest.approx(0.75)
    assert df[df["run"] == "r2"].iloc[0]["progress"] == pytest.approx(0.85)  # 3 stages + 4/10 of training

    at.selectbox(key="runs_selected").set_value("r2").run()
    at.button(key="btn_cancel").click().run()
    with factory() as s:
        assert runs.get_run(s, "r2").cancel_requested
    at.selectbox(key="runs_selected").set_value("r1").run()
    assert at.button(key="btn_cancel").disabled
    at.button(key="btn_retry").click().run()
    with factory() as s:
        assert runs.get_run(s, "r1").status == "queued"  # queued via the outbox; broker down
        assert stages.get_stage(s, "r1", "train").status == "pending"
    assert any("queued automatically" in w for w in _alerts(at, "warning"))


def test_delete_needs_confirmation_and_keeps_files(home):
    factory = _seed_run(home, "r1", status="failed")
    work = home.runs_root / "r1"
    at = _page("2_Runs.py")
    at.button(key="btn_delete").click().run()
    with factory() as s:
        assert runs.get_run(s, "r1") is not None  # not yet: asks first
    assert any("Files in" in w.value for w in at.warning)  # installation text only: st.warning
    at.button(key="btn_delete_confirm").click().run()
    with factory() as s:
        assert runs.get_run(s, "r1") is None
    assert work.exists()  # files kept: the box was not ticked
    assert any("files kept" in x for x in _alerts(at, "success"))


def test_delete_with_files_ticked(home):
    _seed_run(home, "r1", status="failed")
    at = _page("2_Runs.py")
    at.button(key="btn_delete").click().run()
    at.checkbox(key="delete_files").check().run()
    at.button(key="btn_delete_confirm").click().run()
    assert not (home.runs_root / "r1").exists()


def test_run_detail_charts_progress_checkpoints(home):
    _seed_run(home, "r1")
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    charts = at.get("vega_lite_chart")
    titles = [json.loads(c.proto.spec)["title"] for c in charts]
    train = ["Full accuracy: steps 0..k all right", "Conditional accuracy: step k given 0..k-1 right",
             "Step accuracy: step k alone", "Learning rate", "Throughput (tokens/s)"]
    # training and validation in charts of their own (two columns each)
    assert sorted(titles) == sorted(["Loss · train (log)", *(f"{t} · train" for t in train),
                                     "Loss · validation (log)", "Throughput (tokens/s) · validation"])
    progress = at.get("progress")[0]
    assert "training 40%" in progress.proto.text and "ETA" in progress.proto.text
    frames = [d.value for d in at.dataframe]
    by_stage, ckpts = frames[0], frames[1]
    assert list(by_stage["state"]) == ["succeeded"] * 3 + ["running"]
    assert ckpts.iloc[0]["val loss"] == pytest.approx(0.7) and ckpts.iloc[0]["best"] == "★"
    tail = [c.value for c in at.code if "epoch 0 step 3" in c.value]  # the train log tail
    assert tail and "[09:00:01] INFO     epoch 0 step 3" in tail[0] and "\x1b" not in tail[0]
    serve = at.button(key="btn_serve")
    assert not serve.disabled
    serve.click().run()
    with open_store(home.db_url)() as s:
        dep = deployments.latest_deployment(s, "r1")
        assert dep.kind == "draft" and dep.model_path.endswith("checkpoints/0") and dep.status == "requested"
        assert [m.kind for m in outbox.pending(s)] == ["serve"]


def _chart_rows(chart) -> list[dict]:
    """The rows a chart plots (Streamlit sends its data beside the spec, as Arrow)."""
    from streamlit import dataframe_util

    frames = [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets]
    if chart.proto.data.data:
        frames.append(dataframe_util.convert_arrow_bytes_to_pandas_df(chart.proto.data.data))
    seen, out = set(), []
    for row in (row for frame in frames for row in frame.to_dict("records")):
        key = tuple(sorted((k, str(v)) for k, v in row.items()))
        if key not in seen:  # a layered chart (smoothed over raw) may carry its data once per layer
            seen.add(key)
            out.append(row)
    return out


def test_run_detail_shows_the_acceptance_curve_and_latest_positions(home):
    factory = _seed_run(home, "r1")
    points = [(2, 1.25, [0.2, 0.05]), (4, 1.5, [0.375, 0.125]), (6, 1.625, [0.5, 0.125])]
    with factory() as s:
        metrics.ingest_records(s, "r1", [
            {"type": "acceptance", "ts": 100.0 + step, "epoch": 0, "step": step, "mean_acceptance_length": length,
             "acceptance_rate_per_position": rates, "prompts": 8, "tokens": 256, "seconds": 0.5}
            for step, length, rates in points])
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    charts = {json.loads(c.proto.spec)["title"]: c for c in at.get("vega_lite_chart")}
    curve = _chart_rows(charts["Mean acceptance length"])
    assert [(r["step"], r["mean acceptance length"]) for r in curve] == [(p[0], p[1]) for p in points]
    bars = _chart_rows(charts["Acceptance rate per position (step 6)"])
    assert [(r["position"], r["acceptance rate"]) for r in bars] == [(1, 0.5), (2, 0.125)]
    assert any("8 prompts, 256 tokens generated" in t for t in _alerts(at, "caption"))


class _FakeVllm(BaseHTTPRequestHandler):
    METRICS = (
        "# TYPE vllm:spec_decode_num_drafts counter\n"
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="d"} 10.0\n'
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="d"} 30.0\n'
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="d"} 18.0\n'
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="d",position="0"} 9.0\n'
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="d",position="1"} 6.0\n'
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="d",position="2"} 3.0\n'
    )

    MODEL = "set by the test"  # the model id it serves (/v1/models)

    def do_GET(self):
        body = (b"" if self.path == "/health" else self.METRICS.encode() if self.path == "/metrics"
                else json.dumps({"data": [{"id": type(self).MODEL}]}).encode())
        self.send_response(200 if self.path in ("/health", "/metrics", "/v1/models") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_served_checkpoint_shows_endpoint_and_acceptance(home):
    """A deployment the controller reported up: the page checks /health and that the port
    serves this deployment's model name, shows how to call it, and reads the acceptance
    counters from the server's Prometheus /metrics (here a local HTTP server)."""
    from worker.serving import served_name

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        factory = _seed_run(home, "r1", status="succeeded")
        port = server.server_address[1]
        ckpt = str(home.runs_root / "r1" / "checkpoints" / "0")  # the seeded epoch-0 checkpoint, step 4
        with factory() as s:
            metrics.ingest_records(s, "r1", [  # measured while training: at step 4 (the checkpoint's) and later
                {"type": "acceptance", "ts": 1.0, "epoch": 0, "step": step, "mean_acceptance_length": mean,
                 "acceptance_rate_per_position": [0.5, 0.25, 0.125], "prompts": 8, "tokens": 256, "seconds": 0.5}
                for step, mean in ((4, 2.25), (6, 2.5))])
            dep = deployments.request_deployment(s, kind="draft", model_path=ckpt, run_id="r1", port=port,
                                                 endpoint=f"http://127.0.0.1:{port}")
            deployments.update_deployment(s, dep.id, status="up")
        _FakeVllm.MODEL = served_name("r1", dep.id)
        at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
        at.query_params["run"] = "r1"
        at.run()
        assert not at.exception
        assert any("up, healthy" in h.value and f":{port}/v1" in h.value for h in at.get("html"))
        texts = [t.value for t in at.text]
        assert f"Model name to send: {_FakeVllm.MODEL}" in texts and "API key: none needed" in texts
        curl = [c.value for c in at.code if c.value.startswith("curl ")]
        assert curl and f"http://127.0.0.1:{port}/v1/chat/completions" in curl[0] and _FakeVllm.MODEL in curl[0]
        shown = {m.label: m.value for m in at.metric}
        assert shown["Drafted tokens"] == "30" and shown["Accepted tokens"] == "18"
        assert shown["Mean acceptance length"] == "2.80"  # 1 + 18/10
        assert shown["At training time"] == "2.25"  # the served checkpoint's step, not the latest measurement
        bars = _chart_rows(next(c for c in at.get("vega_lite_chart")
                                if json.loads(c.proto.spec)["title"] == "Acceptance rate per position"))
        assert sorted((r["source"], r["position"], r["acceptance rate"]) for r in bars) == sorted(
            [("live (served)", 1, 0.9), ("live (served)", 2, 0.6), ("live (served)", 3, 0.3),
             ("at training time", 1, 0.5), ("at training time", 2, 0.25), ("at training time", 3, 0.125)])
        assert at.button(key="btn_serve").disabled  # already served
        at.button(key="btn_stop").click().run()
        with factory() as s:
            assert deployments.get_deployment(s, dep.id).status == "stopping"
    finally:
        server.shutdown()


def test_home_page(home):
    _seed_run(home, "r1", status="failed")
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=30).run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Failed"] == "1"


def test_uploads_are_kept_under_the_data_root(home):
    from app.common import save_upload

    p = save_upload("../../etc/evil name;rm.jsonl", b'{"conversations": []}\n')
    assert p.parent == home.data_root / "uploads"
    assert p.name.endswith("-evil_name_rm.jsonl") and "/" not in p.name[:-6]
    assert save_upload("other.txt", b"x").name.endswith("-other.txt.jsonl")
    assert save_upload("a.jsonl", b'{"conversations": []}\n') != p  # same bytes, other name: both kept


# ------------------------------------------------ issue 19: the form never changes what it shows


def _form(home, **fields) -> AppTest:
    """The New run page with `fields` typed into their boxes and the dataset set to chats.jsonl."""
    at = _page("1_New_run.py")
    at.radio(key="f_source").set_value("File under data root").run()
    at.text_input(key="f_path").set_value("chats.jsonl")
    for name, value in fields.items():
        at.text_input(key=f"f_{name}").set_value(value)
    return at


def _stored(home):
    with open_store(home.db_url)() as s:
        return runs.list_runs(s)


def test_numbers_out_of_range_are_refused_as_typed(home):
    """A number outside its bounds is refused under its field, quoting what was typed, and the
    box keeps showing it; nothing is stored. A value in bounds is stored exactly as typed."""
    usable = form_defaults(cpu_only=True)["max_samples"]  # the fixture's file holds this many chats
    for typed, needle in [("99999999999999999999", "between 1 and 10000000"), ("3e9", "whole number"),
                          ("0", "between 1 and"), (str(usable + 1), f"has {usable} usable conversations")]:
        at = _form(home, max_samples=typed)
        at.button[0].click().run()
        errs = _errors(at)
        assert any(needle in e for e in errs), (typed, errs)
        if needle != f"has {usable} usable conversations":
            assert any(repr(typed) in e for e in errs)  # the message quotes the value as typed
        assert at.text_input(key="f_max_samples").value == typed  # the box still shows it
        assert _stored(home) == []
    at = _form(home, max_samples=str(usable), epochs="1000", seq_length="1048577")
    at.button[0].click().run()
    assert any("between 16 and 1048576" in e and "'1048577'" in e for e in _errors(at))
    at.text_input(key="f_seq_length").set_value("64")
    at.text_input(key="f_draft_vocab_size").set_value("64")
    at.text_input(key="f_seed").set_value("2147483647").run()
    at.button[0].click().run()
    assert _errors(at) == []
    (run,) = _stored(home)
    assert (run.spec["max_samples"], run.spec["epochs"], run.spec["seq_length"], run.spec["seed"]) == \
        (usable, 1000, 64, 2147483647)


def test_builtin_dataset_bounds_the_samples(home):
    """The built-in ShareGPT holds a fixed number of conversations: asking for more (within the
    schema's maximum) is refused up front with the count, not prepared and dropped in a log."""
    from speculators.data.census import count_usable

    at = _page("1_New_run.py")
    at.selectbox(key="f_builtin").set_value("sharegpt")
    at.text_input(key="f_max_samples").set_value("1000000")
    at.button[0].click().run()
    census = count_usable("sharegpt")
    assert census.complete and 0 < census.usable < 1_000_000
    assert any(f"has {census.usable} usable conversations (of {census.records} records" in e and
               f"use at most {census.usable}" in e for e in _errors(at)), _errors(at)
    assert _stored(home) == []


def test_duplicate_run_names_are_refused(home):
    at = _form(home, name="my run")
    at.button[0].click().run()
    assert _errors(at) == [] and len(_stored(home)) == 1
    at.button[0].click().run()  # the same form again: same name
    assert any("another run already has this name" in e for e in _errors(at))
    assert len(_stored(home)) == 1
    at.text_input(key="f_name").set_value("my run 2")
    at.button[0].click().run()
    assert _errors(at) == [] and sorted(r.name for r in _stored(home)) == ["my run", "my run 2"]
    # a client that skipped the form's check is refused by the store too
    from app.common import submit
    from speculators.config.run import RunSettings

    with pytest.raises(errors.NameTaken):
        submit(RunSettings(**{**RunSettings.from_dict(_stored(home)[0].spec).to_dict(), "name": "my run"}))


EVIL = ("**bold** [a](http://evil.example/a) ![i](http://evil.example/i.png) <img src=x onerror=alert(1)> "
        "<a href='http://evil.example/h'>h</a> http://evil.example/bare www.evil.example")
EVIL_NAME = "**b** [a](http://evil.example/a) ![i](http://evil.example/i.png) <img src=x> www.evil.example"


def _markdown_texts(at: AppTest) -> list[str]:
    """Every text the page renders as Markdown: alerts, markdown, captions, titles, widget
    labels and help."""
    out = []
    for kind in ("markdown", "caption", "error", "warning", "info", "success", "title", "header", "subheader"):
        out += [str(e.value) for e in at.get(kind)]
    for kind in ("text_input", "number_input", "selectbox", "radio", "checkbox", "button", "expander"):
        for e in at.get(kind):
            out += [str(getattr(e, "label", "") or ""), str(getattr(e, "help", "") or "")]
    return out


def _assert_plain(at: AppTest) -> None:
    assert not [t for t in _markdown_texts(at) if "evil" in t]
    for el in at.get("html"):  # the only markup is our wrapper: the text inside is escaped
        m = re.fullmatch(r"<(div|h1)\b[^>]*>(.*)</\1>", el.value, re.S)
        assert m and "<" not in m.group(2), el.value


def test_user_text_is_plain_text_on_the_form_and_the_run_page(home):
    """Markdown and HTML in a run name, in a value echoed by a field error and in a stored
    run's error and model show as typed: only in escaped, non-Markdown elements."""
    at = _form(home, name=EVIL_NAME, lr=EVIL)
    at.button[0].click().run()
    lr_err = [e for e in _alerts(at, "error") if "must be a number" in e]
    assert lr_err and EVIL in lr_err[0]  # shown as typed, as text
    _assert_plain(at)
    at.text_input(key="f_lr").set_value("0.001")
    at.button[0].click().run()
    assert _errors(at) == []
    assert any(EVIL_NAME in x for x in _alerts(at, "success"))
    _assert_plain(at)
    (run,) = _stored(home)
    with open_store(home.db_url)() as s:
        r = runs.get_run(s, run.id)
        r.error = "stage prepare failed: " + EVIL
        r.status = "failed"
        r.spec = {**r.spec, "model": EVIL}
        s.commit()
    page = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    page.query_params["run"] = run.id
    page.run()
    assert not page.exception
    heading = [h.value for h in page.get("html") if h.value.startswith("<h1>")]
    assert heading == ["<h1>" + html.escape(EVIL_NAME) + "</h1>"]
    assert any(EVIL in e for e in _alerts(page, "error"))
    assert any(EVIL in c for c in _alerts(page, "caption"))
    _assert_plain(page)
    runs_page = _page("2_Runs.py")
    _assert_plain(runs_page)


# ------------------------------------------------ issue 19: the run page tells the truth, stays light


def _train_records(start: int, stop: int, total: int = 10) -> list[dict]:
    return [{"type": "train", "ts": 100.0 + step, "epoch": 0, "step": step, "total_steps": total,
             "metrics": {"loss": 2.0 / step, "loss_0": 1.0 / step, "lr": 1e-3}} for step in range(start, stop)]


def test_run_page_reads_only_new_metric_rows(home, monkeypatch):
    """Each refresh asks the store only for rows past the last step it has, never the whole
    table; a new attempt of the train stage (a resume re-emits steps) starts over."""
    factory = _seed_run(home, "r1")
    calls: list[tuple[dict, int]] = []
    real = metrics.step_records

    def spy(session, run_id, after):
        rows = real(session, run_id, after)
        calls.append((dict(after), len(rows)))
        return rows

    monkeypatch.setattr(metrics, "step_records", spy)
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    # the status fragment reads the 4 train + 1 val rows, the charts fragment then nothing new
    assert calls == [({}, 5), ({"train": 4, "val": 4}, 0)]
    with factory() as s:
        stage = stages.get_stage(s, "r1", "train")
        metrics.ingest_records(s, "r1", _train_records(5, 8), stage_id=stage.id)
    at.run()
    assert calls[-2:] == [({"train": 4, "val": 4}, 3), ({"train": 7, "val": 4}, 0)]  # only steps 5-7
    cache = at.session_state["metric_caches"]["r1"]
    assert [p[0] for p in cache.train_points] == list(range(1, 8))
    assert "training 70%" in at.get("progress")[0].proto.text
    at.run()
    assert calls[-1] == ({"train": 7, "val": 4}, 0)  # nothing new: nothing read
    # a resumed train stage (attempt 2) re-emits step 5 with new values: read from the start again
    with factory() as s:
        stages.finish_stage(s, "r1", "train", "failed", "killed")
        runs.resume_run(s, "r1")
        st_ = stages.start_stage(s, "r1", "train", worker="w", log_path="/dev/null")
        metrics.ingest_records(s, "r1", [{**r, "metrics": {"loss": 9.0}} for r in _train_records(5, 6)],
                               stage_id=st_.id)
    at.run()
    assert calls[-2][0] == {}
    cache = at.session_state["metric_caches"]["r1"]
    loss5 = [r["value"] for r in cache.rows if r["step"] == 5 and r["series"] == "train loss"]
    assert loss5 == [9.0]


def _stored_points(factory, run_id: str) -> tuple[int, dict[str, set[tuple[str, int, float]]]]:
    """The run's train and val rows straight from the metrics table: how many, and their
    (metric, step, value) per type."""
    from sqlalchemy import select

    from runstore.models import Metric

    out: dict[str, set[tuple[str, int, float]]] = {"train": set(), "val": set()}
    with factory() as s:
        q = select(Metric.type, Metric.step, Metric.values).where(Metric.run_id == run_id,
                                                                  Metric.type.in_(("train", "val")))
        rows = s.execute(q).all()
    for typ, step, values in rows:
        out[typ] |= {(k, step, float(v)) for k, v in values.items()}
    return len(rows), out


def _plotted(at: AppTest) -> dict[str, list[tuple]]:
    """Every metric chart's points (series, step, x, value, smoothed), by chart title."""
    return {title: sorted((r["series"], r["step"], r["x"], r["value"], r["smoothed"]) for r in _chart_rows(c))
            for title, c in _charts(at).items()}


def test_run_page_after_incremental_refreshes_draws_what_a_full_read_draws(home, monkeypatch):
    """A session refreshed while the run trains (three batches of new rows, a validation each,
    an epoch boundary crossed) reads each stored row once in all, and its charts and progress
    are those of a fresh session that reads the run whole; the plotted points are the rows of
    the metrics table, each curve smoothed over its own steps."""
    factory = _seed_run(home, "r1", spec={"mode": "offline", "model": "m", "epochs": 2})
    fetched = count_step_reads(monkeypatch)
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    with factory() as s:
        stage_id = stages.get_stage(s, "r1", "train").id
    for start, stop in ((5, 7), (7, 10), (10, 14)):
        recs = [{"type": "train", "ts": 100.0 + step, "epoch": (step - 1) // 6, "step": step, "total_steps": 14,
                 "metrics": {"loss": 3.0 / step, "loss_0": 1.5 / step, "full_acc_0": step / 20, "lr": 1e-3 / step}}
                for step in range(start, stop)]
        recs.append({"type": "val", "ts": 100.5 + stop, "epoch": (stop - 2) // 6, "step": stop - 1,
                     "metrics": {"loss": 1.0 / stop}})
        with factory() as s:
            metrics.ingest_records(s, "r1", recs, stage_id=stage_id)
        at.run()
        assert not at.exception
    rows_stored, stored = _stored_points(factory, "r1")
    assert rows_stored == 4 + 1 + 9 + 3 and sum(fetched) == rows_stored  # each row read once, in all

    fresh = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    fresh.query_params["run"] = "r1"
    fresh.run()
    assert not fresh.exception and fetched[-2:] == [rows_stored, 0]  # the fresh session read the run whole
    for axis in ("step", "epoch", "wall time"):
        if axis != "step":
            at.radio(key="x_axis").set_value(axis).run()
            fresh.radio(key="x_axis").set_value(axis).run()
        assert _plotted(at) == _plotted(fresh), axis
    assert at.get("progress")[0].proto.text == fresh.get("progress")[0].proto.text
    assert "training 92%" in at.get("progress")[0].proto.text  # step 13 of 14

    plotted = _plotted(at)
    for kind, suffix in (("train", " · train"), ("val", " · validation")):
        points = [p for title, ps in plotted.items() if title.replace(" (log)", "").endswith(suffix) for p in ps]
        assert {(series, step, value) for series, step, _, value, _ in points} == stored[kind]
        for series in {p[0] for p in points}:
            curve = sorted((step, value, smoothed) for name, step, _, value, smoothed in points if name == series)
            assert [c[2] for c in curve] == pytest.approx(_ema([c[1] for c in curve], 0.6))


def test_charts_are_thinned_but_keep_the_last_step():
    import pandas as pd

    from app.views import MAX_POINTS, thin

    df = pd.DataFrame([{"type": "train", "step": s, "epoch": 0, "metric": m, "value": float(s),
                        "series": f"train {m}"} for s in range(1, 5001) for m in ("loss", "lr")])
    out = thin(df)
    for series, part in out.groupby("series"):
        assert len(part) <= MAX_POINTS + 1 and part["step"].max() == 5000 and part["step"].min() == 1
    small = df[df["step"] <= 100]
    assert thin(small).equals(small)


def test_run_page_says_the_broker_is_unreachable(home):
    """A run between stages while the broker is down says so, with the broker's address,
    instead of only `waiting`."""
    factory = open_store(home.db_url)
    with factory() as s:
        runs.create_run(s, run_id="w1", name="waits", spec={"mode": "offline", "model": "m"},
                        stages=["prepare", "vocab"], work_dir=str(home.runs_root / "w1"))
        stages.start_stage(s, "w1", "prepare", worker="w", log_path="/dev/null")
        stages.finish_stage(s, "w1", "prepare", "succeeded")
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "w1"
    at.run()
    status = [a for a in _alerts(at, "error") if a.startswith("Status: ")]
    assert status == ["Status: waiting · next: vocab · broker unreachable: redis://127.0.0.1:1/0"], _alerts(at, "error")
    assert any("cannot connect to Redis at 127.0.0.1:1" in c for c in _alerts(at, "caption"))
    runs_page = _page("2_Runs.py")
    assert any(a.startswith("broker unreachable: redis://127.0.0.1:1/0") for a in _alerts(runs_page, "error"))


def test_run_page_shows_what_a_running_stage_waits_for_and_prepare_drops(home):
    factory = open_store(home.db_url)
    with factory() as s:
        runs.create_run(s, run_id="o1", name="online", spec={"mode": "online", "model": "m"},
                        stages=["prepare", "verifier"], work_dir=str(home.runs_root / "o1"))
        stages.start_stage(s, "o1", "prepare", worker="w", log_path="/dev/null")
        stages.finish_stage(s, "o1", "prepare", "succeeded")
        st_ = stages.start_stage(s, "o1", "verifier", worker="w", log_path="/dev/null")
        stages.note_stage(s, st_.id, "waiting: http://127.0.0.1:9/health: connection refused")
    prepared = home.runs_root / "o1" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "prepare_config.json").write_text(json.dumps({"counts": {
        "kept": 10, "truncated": 3, "dropped": {"no assistant turn": 4, "no assistant tokens after truncation": 30}}}))
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "o1"
    at.run()
    assert "verifier: waiting: http://127.0.0.1:9/health: connection refused" in _alerts(at, "warning")
    assert ("prepare kept 10 conversations, truncated 3, dropped 34 (no assistant tokens after truncation: 30; "
            "no assistant turn: 4)") in _alerts(at, "warning")


def test_a_port_answered_by_another_server_is_not_called_healthy(home):
    """The deployment says up, but the port is answered by a server of something else (an
    older deployment left running, another program): the page says so and shows no
    acceptance metrics, which would be that other server's."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        factory = _seed_run(home, "r1", status="succeeded")
        port = server.server_address[1]
        with factory() as s:
            dep = deployments.request_deployment(s, kind="draft", model_path="/ck/0", run_id="r1", port=port,
                                                 endpoint=f"http://127.0.0.1:{port}")
            deployments.update_deployment(s, dep.id, status="up")
        _FakeVllm.MODEL = "/runs/older/checkpoints/0"
        at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
        at.query_params["run"] = "r1"
        at.run()
        assert not at.exception
        state = [h.value for h in at.get("html") if f":{port}/v1" in h.value]
        assert state and "up, healthy" not in state[0] and "another server holds it" in state[0], state
        assert not [m for m in at.metric if m.label == "Drafted tokens"]
    finally:
        server.shutdown()


def test_a_failed_server_shows_its_cause_then_the_log(home, tmp_path):
    """A server that died: the cause line the controller found is shown as plain text above
    the log tail."""
    factory = _seed_run(home, "r1", status="succeeded")
    log = tmp_path / "dep.log"
    log.write_text("".join(f"noise line {i}\n" for i in range(100)))
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path="/ck/0", run_id="r1", port=1, endpoint="x")
        deployments.update_deployment(s, dep.id, status="failed", log_path=str(log),
                                      error="ValueError: Available memory on node 0 (19.6/23.54 GiB) on startup is less "
                                            "than desired CPU memory utilization [see](http://evil.example/e) (exit code 1)")
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    errs = [h.value for h in at.get("html") if "Error: " in h.value]
    assert errs and "less than desired" in errs[0] and "[see](http://evil.example/e)" in errs[0]  # not a link
    _assert_plain(at)
    assert any("noise line 99" in c.value for c in at.code)
    assert not at.button(key="btn_serve").disabled  # serve again


# ------------------------------------------------ issue 23: the dashboard a W&B/TensorBoard user expects


def _ema(xs: list[float], w: float) -> list[float]:
    """The debiased EMA, written out as the weighted mean of the points so far."""
    return [sum(w ** (t - i) * (1 - w) * xs[i] for i in range(t + 1)) / (1 - w ** (t + 1)) for t in range(len(xs))]


def _charts(at: AppTest) -> dict:
    return {json.loads(c.proto.spec)["title"]: c for c in at.get("vega_lite_chart")}


def _spec_x_title(chart) -> str:
    spec = json.loads(chart.proto.spec)
    return spec["layer"][0]["encoding"]["x"]["title"]


def test_run_page_axis_smoothing_checkpoints_settings_export(home):
    factory = _seed_run(home, "r1", spec={"mode": "offline", "model": "m", "epochs": 1, "lr": 0.003})
    with factory() as s:
        metrics.ingest_records(s, "r1", [
            {"type": "step_checkpoint", "ts": 103.5, "epoch": 0, "step": 2, "path": "/gone/step_2", "reason": "interval"},
            {"type": "acceptance", "ts": 103.6, "epoch": 0, "step": 2, "mean_acceptance_length": 1.25,
             "acceptance_rate_per_position": [0.25], "prompts": 4, "tokens": 64, "seconds": 0.5}])
    at = AppTest.from_file(str(PAGES / "3_Run_detail.py"), default_timeout=30)
    at.query_params["run"] = "r1"
    at.run()
    assert not at.exception
    loss = _charts(at)["Loss · train (log)"]
    rows = sorted((r for r in _chart_rows(loss) if r["series"] == "loss"), key=lambda r: r["step"])
    assert {r["series"] for r in _chart_rows(loss)} == {"loss", "loss_0"}  # metric names: the chart says train
    values = [2.0 / step for step in range(1, 5)]
    assert [r["value"] for r in rows] == pytest.approx(values)
    assert [r["smoothed"] for r in rows] == pytest.approx(_ema(values, 0.6))  # the default smoothing
    assert [r["x"] for r in rows] == [1, 2, 3, 4] and _spec_x_title(loss) == "step"
    at.slider(key="smoothing").set_value(0.0).run()
    at.radio(key="x_axis").set_value("epoch").run()
    assert not at.exception
    loss = _charts(at)["Loss · train (log)"]
    rows = sorted((r for r in _chart_rows(loss) if r["series"] == "loss"), key=lambda r: r["step"])
    assert [r["smoothed"] for r in rows] == pytest.approx(values)
    assert [r["x"] for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # 1 epoch of 10 steps (the stage's total)
    assert _spec_x_title(loss) == "epoch"
    at.radio(key="x_axis").set_value("wall time").run()
    rows = sorted((r for r in _chart_rows(_charts(at)["Loss · train (log)"]) if r["series"] == "loss"),
                  key=lambda r: r["step"])
    assert [r["x"] for r in rows] == pytest.approx([0.0, 1 / 60, 2 / 60, 3 / 60])  # ts 101..104
    val = _chart_rows(_charts(at)["Loss · validation (log)"])
    assert [(r["step"], r["value"]) for r in val] == [(4, 0.7)]
    curve = _chart_rows(_charts(at)["Mean acceptance length"])
    assert [(r["step"], r["x"]) for r in curve] == [(2, pytest.approx(2.6 / 60))]
    # checkpoints: the mid-epoch one listed (its directory gone), with the acceptance at its step
    ckpts = next(d.value for d in at.dataframe if "kind" in d.value.columns)
    assert list(zip(ckpts["step"], ckpts["kind"], ckpts["on disk"])) == [
        (2, "mid-epoch (interval)", "removed"), (4, "epoch end", "removed")]
    assert ckpts.iloc[0]["acceptance"] == 1.25
    # settings: the run's spec, the defaults beside
    hp = next(d.value for d in at.dataframe if "default" in d.value.columns)
    lr = hp[hp["key"] == "lr"].iloc[0]
    assert lr["value"] == "0.003" and bool(lr["changed"])
    at.toggle(key="hp_changed").set_value(True).run()
    hp = next(d.value for d in at.dataframe if "default" in d.value.columns)
    assert set(hp["key"]) == {"model", "epochs", "lr"}  # mode offline is the default
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Metrics as CSV", "Metrics as JSONL"]


def test_runs_table_shows_best_figures_and_duration(home):
    factory = _seed_run(home, "r1", status="succeeded")
    with factory() as s:
        metrics.ingest_records(s, "r1", [
            {"type": "val", "ts": 200.0, "epoch": 1, "step": 8, "metrics": {"loss": 0.5}},
            {"type": "acceptance", "ts": 1.0, "epoch": 0, "step": 4, "mean_acceptance_length": 1.75,
             "acceptance_rate_per_position": [0.5], "prompts": 4, "tokens": 64, "seconds": 0.5},
            {"type": "acceptance", "ts": 2.0, "epoch": 1, "step": 8, "mean_acceptance_length": 1.5,
             "acceptance_rate_per_position": [0.4], "prompts": 4, "tokens": 64, "seconds": 0.5}])
    _seed_run(home, "r2", with_metrics=False)
    at = _page("2_Runs.py")
    assert not at.exception
    df = at.dataframe[0].value
    r1, r2 = df[df["run"] == "r1"].iloc[0], df[df["run"] == "r2"].iloc[0]
    assert r1["best val loss"] == 0.5 and r1["best acceptance"] == 1.75 and r1["duration"].endswith("s")
    assert pd_isna(r2["best val loss"]) and pd_isna(r2["best acceptance"])


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def test_compare_page_overlays_runs_and_shows_what_differs(home):
    f = _seed_run(home, "r1", status="succeeded", spec={"mode": "offline", "model": "m", "lr": 0.001})
    _seed_run(home, "r2", spec={"mode": "offline", "model": "m", "lr": 0.003})
    _seed_run(home, "r3", status="failed")
    with f() as s:
        metrics.ingest_records(s, "r1", [
            {"type": "acceptance", "ts": 101.0 + step, "epoch": 0, "step": step, "mean_acceptance_length": mean,
             "acceptance_rate_per_position": [0.5], "prompts": 4, "tokens": 64, "seconds": 0.5}
            for step, mean in ((2, 1.25), (4, 1.5))])
    at = AppTest.from_file(str(PAGES / "4_Compare.py"), default_timeout=30)
    at.query_params["runs"] = "r1,r2"
    at.run()
    assert not at.exception
    assert at.multiselect(key="compare_runs").value == ["r1", "r2"]
    table = at.dataframe[0].value
    assert list(table["run"]) == ["seeded r2", "seeded r1"]  # newest first
    r1 = table[table["run"] == "seeded r1"].iloc[0]
    assert r1["best val loss"] == 0.7 and r1["best acceptance"] == 1.5 and r1["acceptance step"] == 4
    charts = _charts(at)
    assert set(charts) == {"loss (log)", "full_acc_0", "mean acceptance length"}
    rows = _chart_rows(charts["loss (log)"])
    series = {r["series"] for r in rows}
    assert series == {"train · seeded r1", "val · seeded r1", "train · seeded r2", "val · seeded r2"}
    r2_train = sorted((r for r in rows if r["series"] == "train · seeded r2"), key=lambda r: r["step"])
    values = [2.0 / step for step in range(1, 5)]
    assert [r["value"] for r in r2_train] == pytest.approx(values)
    assert [r["smoothed"] for r in r2_train] == pytest.approx(_ema(values, 0.6))
    acc = _chart_rows(charts["mean acceptance length"])
    assert sorted((r["series"], r["step"], r["value"]) for r in acc) == [
        ("acceptance · seeded r1", 2, 1.25), ("acceptance · seeded r1", 4, 1.5)]
    settings = next(d.value for d in at.dataframe if "differs" in d.value.columns)
    assert list(settings["setting"]) == ["Learning rate"]  # only what differs (the spec has no name)
    assert list(settings.iloc[0][["seeded r2", "seeded r1"]]) == ["0.003", "0.001"]
    at.multiselect(key="compare_metrics").set_value(["lr"]).run()
    at.radio(key="compare_axis").set_value("wall time").run()
    assert not at.exception
    assert set(_charts(at)) == {"lr"}
