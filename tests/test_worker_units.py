"""Worker parts that need no worker process: JSONL tail, spec validation, stage commands,
the outbox dispatcher against a dead and a live Redis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from runstore import deployments, open_store, outbox, runs, stages
from runstore.settings import Settings
from speculators.config.stages import StagePaths, pipeline_stages
from worker.celery_app import make_celery
from worker.dispatch import broker_reachable, flush_outbox
from worker.pipeline import serve_argv, stage_argv, verifier_argv
from worker.procs import error_summary
from worker.spec import validate_spec
from worker.tail import JsonlTail

from tests.support.wait import wait_for

TEST_REDIS = os.environ.get("SPEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


@pytest.fixture()
def settings(tmp_path, spec_home):
    return spec_home(tmp_path / "home", MAX_GPUS=2)


def _good(settings, **over):
    chat = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (settings.data_root / "chats.jsonl").write_text((json.dumps(chat) + "\n") * 8)
    model = settings.models_root / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 8, "vocab_size": 512}))
    raw = {"name": "r", "model": str(model), "dataset": "chats.jsonl", "seq_length": 64, "max_samples": 8,
           "layer_ids": "2,4,7", "draft_vocab_size": 128, "epochs": 1, "lr": "1e-3", "ttt_steps": 2,
           "num_layers": 1, "mode": "offline", "gpus": 0}
    raw.update(over)
    return raw


def _settings(argv: list[str]) -> dict:
    """The settings a stage's process reads: the file its `--config` names."""
    return json.loads(Path(argv[argv.index("--config") + 1]).read_text())


def test_tail_returns_complete_lines_only(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []  # file not there yet
    with open(path, "w") as fh:
        fh.write('{"type": "train", "step": 1}\n{"type": "tr')
    assert tail.read_new() == [{"type": "train", "step": 1}]
    with open(path, "a") as fh:
        fh.write('ain", "step": 2}\nnot json\n')
    assert tail.read_new() == [{"type": "train", "step": 2}]
    assert tail.bad_lines == 1
    path.write_text('{"type": "start"}\n')  # replaced by a shorter file: starts over
    assert tail.read_new() == [{"type": "start"}]


def test_valid_spec(settings):
    spec, errors = validate_spec(_good(settings), settings)
    assert errors == {}
    assert spec.dataset == str((settings.data_root / "chats.jsonl").resolve())
    assert spec.layer_ids == [2, 4, 7] and spec.lr == 1e-3


@pytest.mark.parametrize("field,value,needle", [
    ("seq_length", "abc", "whole number"),
    ("seq_length", 4, "between"),
    ("epochs", 0, "between"),
    ("lr", "-1", "(0.0, 1.0]"),
    ("layer_ids", "2,x", "comma-separated"),
    ("layer_ids", "2,2", "repeats"),
    ("layer_ids", "2,9", "[0, 8]"),
    ("draft_vocab_size", 1000, "vocabulary (512)"),
    ("mode", "sideways", "one of"),
    ("gpus", 3, "between 0 and 2"),
    ("name", "", "give the run a name"),
    ("name", "a\nb", "control characters"),
    ("dataset", "../../etc/passwd.jsonl", "inside the data root"),
    ("dataset", "/etc/passwd", "inside the data root"),
    ("dataset", "missing.jsonl", "no such file"),
    ("model", "/etc", "must be under"),
    ("model", "org/../x", "not a valid model id"),
    ("vllm_endpoint", "file:///etc", "http"),
])
def test_invalid_fields_name_the_field(settings, field, value, needle):
    spec, errors = validate_spec(_good(settings, **{field: value}), settings)
    assert spec is None
    assert field in errors and needle in errors[field], errors


def test_dataset_symlink_out_of_root_rejected(settings, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    (settings.data_root / "link.jsonl").symlink_to(outside)
    _, errors = validate_spec(_good(settings, dataset="link.jsonl"), settings)
    assert "inside the data root" in errors["dataset"]


def test_online_needs_endpoint_or_gpu(settings):
    _, errors = validate_spec(_good(settings, mode="online"), settings)
    assert "vLLM server" in errors["mode"]
    _, errors = validate_spec(_good(settings, mode="online", vllm_endpoint="http://vllm:8001"), settings,
                              check_endpoint=None)
    assert errors == {}


def test_stage_commands_are_argument_lists(settings, tmp_path):
    name = 'x; rm -rf / && $(touch pwned) `id` "q" \'s\''
    spec, errors = validate_spec(_good(settings, name=name), settings)
    assert errors == {}
    paths = StagePaths(tmp_path / "w")
    assert pipeline_stages(spec) == ["prepare", "vocab", "datagen", "train"]
    train = stage_argv(spec, "train", paths, python="py")
    # the settings travel as a file in the run's folder, the command line only names it
    assert train == ["py", "-m", "speculators", "train", "--config", str(tmp_path / "w" / "settings" / "train.json")]
    assert _settings(train)["run_name"] == name  # one value, untouched
    assert _settings(train)["d2t_path"] == str(paths.vocab / "d2t.npy")
    dg = stage_argv(spec, "datagen", paths, python="py")
    assert _settings(dg)["layer_ids"] == [2, 4, 7]
    prep = stage_argv(spec, "prepare", paths, python="py")
    assert _settings(prep)["data"] == spec.dataset
    spec.gpus = 2
    multi = stage_argv(spec, "train", paths, python="py")
    assert multi[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert multi[6:] == ["-m", "speculators.train", "--config", str(paths.settings("train"))]


def test_online_train_command(settings, tmp_path):
    spec, _ = validate_spec(_good(settings, mode="hybrid", gpus=1), settings)
    assert pipeline_stages(spec) == ["prepare", "vocab", "verifier", "train"]
    argv = stage_argv(spec, "train", StagePaths(tmp_path), python="py", verifier_url="http://vllm:8001")
    assert _settings(argv)["vllm_endpoint"] == "http://vllm:8001"
    assert _settings(argv)["on_generate"] == "cache"
    v = verifier_argv(spec.model, [2, 4], 8001, "/hs", python="py")
    assert v[3:7] == ["launch-vllm", spec.model, "--hidden-states-path", "/hs"]
    assert v[v.index("--") + 1:] == ["--host", "127.0.0.1", "--port", "8001", "--no-enable-chunked-prefill"]
    assert verifier_argv(spec.model, [], 8001, "/hs", python="py", host="0.0.0.0")[-5:-3] == ["--host", "0.0.0.0"]
    assert serve_argv("/ck/checkpoint_best", 8000, python="py")[3:5] == ["serve", "/ck/checkpoint_best"]


def test_error_summary_prefers_cli_error_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("$ py -m speculators train\nwarming up\nerror: --data-path /x has no data_config.json\nbye\n")
    assert error_summary(log, 2) == "--data-path /x has no data_config.json (exit code 2)"


def test_outbox_survives_broker_down_and_flushes_when_back(settings, monkeypatch):
    factory = open_store(settings.db_url)
    spec, _ = validate_spec(_good(settings), settings)
    with factory() as s:
        runs.create_run(s, run_id="out1", name="r", spec=spec.to_dict(), stages=pipeline_stages(spec),
                        work_dir=str(settings.runs_root / "out1"))

    monkeypatch.setenv("SPEC_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    down = make_celery(Settings.from_env())
    assert not broker_reachable(down, timeout=1)
    sent, err = flush_outbox(factory, down)
    assert sent == 0 and err
    with factory() as s:
        (msg,) = outbox.pending(s)
        assert "cannot connect to Redis" in msg.last_error
        assert runs.get_run(s, "out1").status == "queued"  # nothing lost

    client = redis.Redis.from_url(TEST_REDIS)
    client.flushdb()
    monkeypatch.setenv("SPEC_BROKER_URL", TEST_REDIS)
    up = make_celery(Settings.from_env())
    assert flush_outbox(factory, up) == (1, None)
    with factory() as s:
        assert outbox.pending(s) == []
    # the queue key carries the installation's namespace (two homes on one Redis stay apart)
    assert client.llen("gpu") == 0
    queued = [json.loads(m) for m in client.lrange(f"{up.conf.broker_transport_options['global_keyprefix']}gpu", 0, -1)]
    assert len(queued) == 1
    assert queued[0]["headers"]["task"] == "worker.tasks.run_stage"
    assert json.loads(__import__("base64").b64decode(queued[0]["body"]))[0] == ["out1", "prepare"]
    client.flushdb()


def _health_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_verifier_stage_with_user_endpoint_and_with_controller(settings):
    """online/hybrid: the verifier stage waits for the user's server, or asks the controller
    for one and passes its URL to the trainer."""
    import threading

    from worker.runner import _verifier_url, execute_stage

    server = _health_server()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    factory = open_store(settings.db_url)
    try:
        spec, errors = validate_spec(_good(settings, mode="online", vllm_endpoint=url), settings)
        assert errors == {}
        with factory() as s:
            runs.create_run(s, run_id="v1", name="r", spec=spec.to_dict(), stages=["verifier"],
                            work_dir=str(settings.runs_root / "v1"))
        assert execute_stage(factory, settings, "v1", "verifier", worker="t") == "succeeded"

        spec, errors = validate_spec(_good(settings, mode="hybrid", gpus=1), settings)
        assert errors == {}
        with factory() as s:
            runs.create_run(s, run_id="v2", name="r", spec=spec.to_dict(), stages=["verifier"],
                            work_dir=str(settings.runs_root / "v2"))

        def controller():  # plays the vLLM controller: reports the requested server up
            def requested():
                with factory() as s:
                    return deployments.latest_deployment(s, "v2", kind="verifier")
            dep = wait_for(requested, 60, interval=0.05, what="verifier request")
            with factory() as s:
                deployments.update_deployment(s, dep.id, status="up", endpoint=url)
        t = threading.Thread(target=controller)
        t.start()
        sent = []
        assert execute_stage(factory, settings, "v2", "verifier", worker="t",
                             dispatch=lambda: sent.append(1)) == "succeeded"
        t.join()
        assert sent == [1]
        with factory() as s:
            (msg,) = [m for m in outbox.pending(s) if m.kind == "serve"]
            assert msg.payload["hidden_dir"] == str(settings.runs_root / "v2" / "hidden_states")
        assert _verifier_url(factory, "v2") == url
    finally:
        server.shutdown()



def test_local_mode_picks_redis_when_it_answers(tmp_path, monkeypatch):
    from worker.local import dashboard_argv, local_env, worker_argv

    monkeypatch.delenv("SPEC_BROKER_URL", raising=False)
    env = local_env(tmp_path, TEST_REDIS)
    assert env["SPEC_BROKER_URL"] == TEST_REDIS
    env = local_env(tmp_path, "redis://127.0.0.1:1/0")
    assert env["SPEC_BROKER_URL"] == "filesystem://"  # embedded broker, nothing to install
    assert env["SPEC_HOME"] == str(tmp_path) and env["SPEC_MAX_GPUS"] == "0"
    argv = worker_argv("gpu", "gpu0@%h", filesystem=True)
    assert argv[argv.index("-Q") + 1] == "gpu" and "--without-gossip" in argv
    dash = dashboard_argv(8501, "127.0.0.1")
    assert dash[dash.index("--server.address") + 1] == "127.0.0.1"


def test_tiny_build_status_shows_latest_line_and_elapsed(tmp_path):
    """What the dashboard shows while the local mode builds the tiny verifier: the newest
    output line (a progress bar's \\r rewrites count) and the time since the build started."""
    from worker.tinybuild import log_file, read_status, write_status

    model = tmp_path / "models" / "tiny-llama"
    assert read_status(model) is None  # no build started: nothing to show
    write_status(model, "building", started=1000.0)
    log_file(model).write_text("building tokenizer\npretraining 10%\rpretraining 40%\r")
    st = read_status(model, now=1042.0)
    assert (st.state, st.elapsed_s, st.last_line) == ("building", 42.0, "pretraining 40%")
    write_status(model, "failed", started=1000.0, error="boom (exit code 1)")
    st = read_status(model)
    assert st.state == "failed" and st.error == "boom (exit code 1)" and st.elapsed_s < 10**10


def test_error_summary_names_the_signal(tmp_path):
    """A stage killed by a signal (the OOM killer's SIGKILL) is reported as such, not as the
    last line it printed."""
    log = tmp_path / "x.log"
    log.write_text("=== train attempt 1 on w\n$ speculators train ...\nepoch 0 step 3\n")
    assert error_summary(log, -9).startswith("killed (signal 9: SIGKILL); the kernel's out-of-memory killer")
    assert error_summary(log, 137).startswith("killed (signal 9: SIGKILL)")
    assert error_summary(log, -15).startswith("killed (signal 15: SIGTERM)")
    assert error_summary(log, 1) == "epoch 0 step 3 (exit code 1)"
    # a last line in the commands' log format: its message, without time, level and file:line
    log.write_text("$ speculators train ...\n[09:00:01] WARNING  disk almost full  trainer.py:12\n")
    assert error_summary(log, 1) == "disk almost full (exit code 1)"


def test_every_stage_reports_progress_to_its_bar(settings, tiny_llama):
    """regenerate and prepare write progress lines ($SPECULATORS_PROGRESS_FILE, set by the
    worker) that the worker reads into the stage's step columns, as the trainer's records
    fill train's: their bars move too."""
    from worker.runner import execute_stage
    from speculators.config.run import RunSettings

    spec = RunSettings(name="p", model=str(tiny_llama), dataset="sharegpt", seq_length=64, max_samples=3,
                   draft_vocab_size=64, epochs=1, regenerate=True, regenerate_max_tokens=4)
    factory = open_store(settings.db_url)
    with factory() as s:
        runs.create_run(s, run_id="p1", name="p", spec=spec.to_dict(), stages=pipeline_stages(spec),
                        work_dir=str(settings.runs_root / "p1"))
    for stage in ("regenerate", "prepare"):
        assert execute_stage(factory, settings, "p1", stage, worker="t") == "succeeded"
        with factory() as s:
            row = stages.get_stage(s, "p1", stage)
            assert (row.current_step, row.total_steps) == (3, 3), (stage, row.current_step, row.total_steps)
        lines = (StagePaths(settings.runs_root / "p1").logs / f"{stage}.progress.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["done"] == 3


def test_online_run_endpoint_checked_at_submit_and_before_the_first_stage(settings):
    """A vLLM URL that accepts no connection is refused by the form's validation, and a run
    stored anyway (another client) fails at its first stage saying so, before any data stage."""
    import socket

    from worker.runner import execute_stage

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
    server = _health_server()
    live = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _, errors = validate_spec(_good(settings, mode="online", vllm_endpoint=dead), settings)
        assert "cannot reach" in errors["vllm_endpoint"] and "connection refused" in errors["vllm_endpoint"]
        spec, errors = validate_spec(_good(settings, mode="online", vllm_endpoint=live), settings)
        assert errors == {}
        spec.vllm_endpoint = dead
        factory = open_store(settings.db_url)
        with factory() as s:
            runs.create_run(s, run_id="e1", name="e", spec=spec.to_dict(), stages=pipeline_stages(spec),
                            work_dir=str(settings.runs_root / "e1"))
        assert execute_stage(factory, settings, "e1", "prepare", worker="t") == "failed"
        with factory() as s:
            run = runs.get_run(s, "e1")
            assert run.status == "failed"
            assert f"the vLLM endpoint {dead} is unreachable (connection refused)" in run.error
            assert stages.get_stage(s, "e1", "prepare").pid is None
        assert not (settings.runs_root / "e1" / "prepared").exists()  # nothing ran
    finally:
        server.shutdown()
        sock.close()
