"""launch-vllm: layer choice, the vLLM command line, and the passthrough contract."""

import json

import pytest

from speculators.cli import main
from speculators.errors import UserError
from speculators.layers import default_layer_ids
from speculators.vllm.launch import (
    HiddenStatesLaunch,
    endpoint_from_args,
    kv_transfer_config,
    served_model_name,
    speculative_config,
    vllm_command_prefix,
)
from speculators.vllm.layers import resolve_layer_ids


def test_default_layers_follow_low_mid_high_plus_final():
    assert default_layer_ids(8) == [2, 4, 5, 8]
    assert default_layer_ids(32) == [2, 16, 29, 32]
    assert default_layer_ids(3) == [0, 1, 2, 3]  # tiny models: the distinct ids, clamped
    with pytest.raises(UserError):
        default_layer_ids(1)


def test_custom_layers_get_final_layer_and_are_checked():
    assert resolve_layer_ids(8, [1, 3, 6]) == [1, 3, 6, 8]
    assert resolve_layer_ids(8, [1, 3, 6], include_last_layer=False) == [1, 3, 6]
    assert resolve_layer_ids(8, [1, 8]) == [1, 8]
    with pytest.raises(UserError, match="out of range"):
        resolve_layer_ids(8, [1, 9])
    with pytest.raises(UserError, match="repeats"):
        resolve_layer_ids(8, [3, 3])


def test_command_carries_vllm_configs_and_passthrough_in_order():
    launch = HiddenStatesLaunch("m/x", [2, 4, 5, 8], "/data/hs", ["--port", "9000", "--tensor-parallel-size", "2"])
    cmd = launch.command(["vllm"])
    assert cmd[:3] == ["vllm", "serve", "m/x"]
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == speculative_config([2, 4, 5, 8])
    assert spec["method"] == "extract_hidden_states" and spec["num_speculative_tokens"] == 1
    assert spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5, 8]
    kv = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert kv == kv_transfer_config("/data/hs")
    assert kv["kv_connector"] == "ExampleHiddenStatesConnector" and kv["kv_role"] == "kv_producer"
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == "/data/hs"
    assert cmd[-4:] == ["--port", "9000", "--tensor-parallel-size", "2"]


@pytest.mark.parametrize("flag", ["--speculative-config", "--kv_transfer_config={}"])
def test_passthrough_may_not_override_our_configs(flag):
    with pytest.raises(UserError, match="conflicts"):
        HiddenStatesLaunch("m", [1, 2], "/x", [flag, "{}"]).command(["vllm"])


def test_endpoint_and_model_name_from_vllm_args():
    assert endpoint_from_args([]) == "http://127.0.0.1:8000"
    assert endpoint_from_args(["--port=9001", "--host", "0.0.0.0"]) == "http://127.0.0.1:9001"
    assert endpoint_from_args(["--host", "gpu1", "--port", "7"]) == "http://gpu1:7"
    with pytest.raises(UserError):
        endpoint_from_args(["--port", "x"])
    assert served_model_name("m", ["--served-model-name", "alias"]) == "alias"
    assert served_model_name("m", []) == "m"


def test_vllm_prefix_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECULATORS_VLLM_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="not installed"):
        vllm_command_prefix()
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert vllm_command_prefix() == [str(fake)]
    with pytest.raises(UserError, match="not an executable"):
        vllm_command_prefix(str(tmp_path / "nope"))


def test_cli_dry_run_reads_layer_count_from_the_model(tiny_llama, capsys, tmp_path):
    rc = main(["launch-vllm", str(tiny_llama), "--dry-run", "--hidden-states-path", str(tmp_path / "hs"),
               "--", "--port", "8123", "--gpu-memory-utilization", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[2, 4, 5, 8]" in out and "--gpu-memory-utilization 0.5" in out
    assert str(tmp_path / "hs") in out


def test_cli_rejects_bad_layers_as_user_error(tiny_llama, capsys):
    rc = main(["launch-vllm", str(tiny_llama), "--dry-run", "--target-layer-ids", "1", "12"])
    assert rc == 2
    assert "--target-layer-ids" in capsys.readouterr().err
