"""serve and launch-vllm end to end against a fake `vllm` that runs the local test server."""

import json
import os
import subprocess
import sys
import time

import pytest

from speculators.cli import main
from speculators.errors import UserError
from speculators.testing.hs_server import free_port, write_fake_vllm
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


def test_serve_checks_readiness_and_prints_chat_help(speculator_dir, tmp_path, monkeypatch, capsys):
    write_fake_vllm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    port = free_port()
    rc = main(["serve", str(speculator_dir), "--exit-when-ready", "--ready-timeout", "60",
               "--", "--port", str(port), "--startup-delay", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in out and "vllm chat" in out
    assert f"serve {(speculator_dir / '0').resolve()}" in out and "3 speculative tokens" in out
    import requests

    with pytest.raises(requests.ConnectionError):  # stopped after the smoke test
        requests.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_a_server_that_dies_is_reported(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(ServerStartError, match="exited with code 3"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=30, poll_s=0.1, process=proc)
    with pytest.raises(ServerStartError, match="not ready"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout_s=0.3, poll_s=0.1)


@pytest.mark.slow
def test_launch_vllm_serves_hidden_states_end_to_end(tiny_llama, tmp_path):
    from speculators.testing.hs_server import transformers_compute
    from speculators.vllm.client import ClientConfig, HiddenStatesClient

    fake = write_fake_vllm(tmp_path)
    port = free_port()
    hs_dir = tmp_path / "hs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "speculators.cli", "launch-vllm", str(tiny_llama), "--vllm-bin", str(fake),
         "--target-layer-ids", "1", "3", "6", "--hidden-states-path", str(hs_dir), "--", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("ready:") or not line:
                break
        assert any(l.startswith("ready:") for l in lines), "".join(lines)
        client = HiddenStatesClient(ClientConfig(endpoint=f"http://127.0.0.1:{port}", num_layers=4))
        tokens = [3, 14, 15, 92, 65]
        hs = client.fetch(tokens)
        assert hs.shape == (5, 4, 64)
        import torch

        assert torch.equal(hs, transformers_compute(tiny_llama, [1, 3, 6, 8])(tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import requests

    with pytest.raises(requests.ConnectionError):  # SIGTERM to launch-vllm stops vLLM too
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
