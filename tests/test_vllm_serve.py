"""serve: the speculator config checks, and clear errors when vLLM is missing, broken or dies.

Serving with the real engine: tests/test_real_vllm.py."""

import json
import os
import subprocess
import sys
import time

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
    t0 = time.monotonic()
    rc = main(["serve", str(speculator_dir), "--vllm-bin", str(broken), "--ready-timeout", "600",
               "--", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 60
    assert "exited with code 1" in err and "make vllm" in err


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
