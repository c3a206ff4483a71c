"""Run an unpacked vLLM wheel's own Python code on what speculators hands it (no server, no GPU).

`tests/test_vllm_034.py` runs this file in a subprocess with the wheel's pure-Python tree first
on ``sys.path`` (so ``import vllm`` is that version, not the installed CPU build) and reads one
JSON object from the last stdout line. Input: a JSON file (argv[1]) with

* ``argvs``: name -> a `vllm serve ...` argument list as our command builders make it. Each is
  parsed by vLLM's own serve parser (``make_arg_parser``, ``validate_parsed_serve_args``), then
  taken through the steps of ``EngineArgs.create_engine_config`` up to the speculative config:
  ``maybe_override_with_speculators``, ``create_model_config``, ``create_speculative_config``,
  and the ``KVTransferConfig`` it parsed. (``VllmConfig`` itself is not built: the x86 CPU
  platform refuses to run without triton-cpu, which only matters for running the engine.)
* ``speculators_configs``: name -> a config.json path, through
  ``SpeculatorsConfig.validate_speculators_config`` and ``extract_transformers_pre_trained_config``.
* ``metrics``: ``[[engine, drafted, accepted], ...]`` observed by vLLM's ``SpecDecodingProm``;
  the Prometheus text it exports comes back.
* ``connector_file``: our connector module; the ``self.`` attributes it reads are looked up in
  vLLM's ``ExampleHiddenStatesConnector.__init__`` (names only, by ``ast``).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import textwrap
import traceback
from typing import Any


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_argv(argv: list[str]) -> dict[str, Any]:
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.transformers_utils.config import maybe_override_with_speculators
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    subparsers = parser.add_subparsers(dest="subparser")
    make_arg_parser(subparsers.add_parser("serve"))
    out: dict[str, Any] = {}
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
        if getattr(args, "model_tag", None) is not None:  # what `vllm serve MODEL` does
            args.model = args.model_tag
        engine = AsyncEngineArgs.from_cli_args(args)
        out.update(host=args.host, port=args.port, dtype=engine.dtype, enforce_eager=engine.enforce_eager,
                   max_model_len=engine.max_model_len, enable_chunked_prefill=engine.enable_chunked_prefill,
                   tensor_parallel_size=engine.tensor_parallel_size,
                   gpu_memory_utilization=engine.gpu_memory_utilization, seed=engine.seed)
        kv = engine.kv_transfer_config
        if kv is not None:
            out["kv"] = {"connector": kv.kv_connector, "role": kv.kv_role,
                         "extra": kv.kv_connector_extra_config, "module_path": kv.kv_connector_module_path}
        model, tokenizer, spec = maybe_override_with_speculators(
            model=engine.model, tokenizer=engine.tokenizer, trust_remote_code=engine.trust_remote_code,
            revision=engine.revision, vllm_speculative_config=engine.speculative_config)
        out["override"] = {"model": model, "speculative_config": spec}
        engine.model, engine.tokenizer, engine.speculative_config = model, tokenizer, spec
        if not os.path.exists(model):
            return out  # a hub id: nothing to read offline
        target = engine.create_model_config()
        out["model"] = target.model
        sc = engine.create_speculative_config(target, ParallelConfig())
        if sc is not None:
            hf = sc.draft_model_config.hf_config
            out["spec"] = {
                "method": sc.method, "model": sc.model, "num_speculative_tokens": sc.num_speculative_tokens,
                "architectures": list(sc.draft_model_config.architectures or []),
                "hf_config_class": type(hf).__name__,
                "uses_aux_hidden_states": bool(sc.uses_aux_hidden_states),
                **{k: _plain(getattr(hf, k, None)) for k in (
                    "eagle_aux_hidden_state_layer_ids", "draft_vocab_size", "norm_before_residual",
                    "norm_before_fc", "fc_norm", "norm_output", "layer_types", "sliding_window",
                    "num_hidden_layers")},
            }
    except Exception as exc:  # what vLLM refuses, with its message
        out["error"] = _err(exc)
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def run_speculators_config(path: str) -> dict[str, Any]:
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    config_dict = json.loads(open(path).read())
    try:
        spec = SpeculatorsConfig.extract_vllm_speculative_config(config_dict)
        hf = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(config_dict)))
        return {"speculative_config": spec, "architectures": hf.get("architectures")}
    except Exception as exc:
        return {"error": _err(exc)}


def run_metrics(steps: list[list[int]], num_spec_tokens: int, model_name: str) -> str:
    import prometheus_client
    from types import SimpleNamespace

    from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

    engines = sorted({int(e) for e, _, _ in steps}) or [0]
    prom = SpecDecodingProm(SimpleNamespace(num_speculative_tokens=num_spec_tokens), ["model_name", "engine"],
                            {e: [model_name, str(e)] for e in engines})
    for engine, drafted, accepted in steps:
        stats = SpecDecodingStats.new(num_spec_tokens)
        stats.observe_draft(int(drafted), int(accepted))
        prom.observe(stats, int(engine))
    return prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()


def run_connector(connector_file: str) -> dict[str, Any]:
    """The ``self.`` attributes our subclass reads vs those vLLM's connector sets up."""
    import dataclasses

    from vllm.distributed.kv_transfer.kv_connector.v1 import example_hidden_states_connector as m

    ours = ast.parse(open(connector_file).read())
    used: set[str] = set()
    for node in ast.walk(ours):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            used.add(node.attr)
    parent = ast.parse(textwrap.dedent(inspect.getsource(m.ExampleHiddenStatesConnector)))
    assigned: set[str] = set()
    methods: set[str] = set()
    for node in ast.walk(parent):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            methods.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                assigned.add(t.attr)
    return {
        "used": sorted(used),
        "assigned": sorted(assigned),
        "methods": sorted(methods),
        "submit_params": list(inspect.signature(m.ExampleHiddenStatesConnector._submit_async_write).parameters),
        "pending_fields": [f.name for f in dataclasses.fields(m.PendingSave)],
        "extract_params": list(inspect.signature(m.extract_from_kv_cache).parameters),
    }


def main(spec_path: str) -> dict[str, Any]:
    import vllm

    spec = json.loads(open(spec_path).read())
    report: dict[str, Any] = {"version": vllm.__version__, "file": vllm.__file__}
    report["argvs"] = {name: run_argv(argv) for name, argv in spec.get("argvs", {}).items()}
    report["speculators_configs"] = {name: run_speculators_config(p)
                                     for name, p in spec.get("speculators_configs", {}).items()}
    if "metrics" in spec:
        m = spec["metrics"]
        report["metrics_text"] = run_metrics(m["steps"], m["num_spec_tokens"], m["model_name"])
    if "connector_file" in spec:
        report["connector"] = run_connector(spec["connector_file"])
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES

    report["speculators_types"] = sorted(SUPPORTED_SPECULATORS_TYPES)
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
