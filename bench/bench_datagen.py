"""Datagen throughput (tokens/s) of the hidden-state backends.

Builds random-weight verifiers locally (no hub access), a prepared dataset of random token
ids of fixed length, and times

* `forward`  - `TransformersGenerator.generate` alone (verifier forward + hook capture), and
* `end2end`  - `speculators.datagen.runner.run_datagen` (read dataset, generate, check,
               write `data_<i>.pt` atomically, data_config.json): what `speculators datagen` does.

Verifiers: `tiny` (speculators.tiny.builders: hidden 64, 8 layers, vocab ~512), `small`
(random Llama, hidden 1024, 8 layers, 16 heads, vocab 32000; about 0.2B parameters), or
`NAME=DIR` for one on disk (the vLLM CPU build needs head_dim >= 32: `demo=WORKDIR/verifier`,
the embedded default verifier `speculators demo` builds).
`--backends transformers,vllm` times both side by side (vLLM: a GPU machine, or the CPU build of
vLLM here); the vLLM server is started once per compute dtype, its start-up reported apart.
`--hidden-states-dtypes bf16,fp8` times the end-to-end run once per storage dtype
(`--hidden-states-dtype`) and reports the bytes on disk per token of each.

    python bench/bench_datagen.py --models tiny,small --samples 16 --seq-len 512
    python bench/bench_datagen.py --models tiny --dtypes float32 --backends transformers,vllm \\
        --hidden-states-dtypes bf16,fp8 --name datagen_backends
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import fmt, log, write_result  # noqa: E402
from synthetic import dir_bytes  # noqa: E402


def build_verifier(kind: str, path: Path) -> Path:
    if "=" in kind:  # NAME=DIR: a verifier on disk (e.g. the demo's; vLLM's CPU attention needs head_dim >= 32)
        return Path(kind.split("=", 1)[1])
    if kind == "tiny":
        from speculators.tiny.builders import build_tiny_verifier

        return build_tiny_verifier(path, arch="llama")
    if kind == "small":
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
            tie_word_embeddings=False, pad_token_id=0,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(path)
        return path
    raise SystemExit(f"unknown verifier {kind!r}: tiny or small")


def write_prepared(path: Path, vocab: int, samples: int, seq_len: int) -> Path:
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (samples, seq_len), generator=g).tolist()
    mask = [[0] * (seq_len // 4) + [1] * (seq_len - seq_len // 4) for _ in range(samples)]
    Dataset.from_dict({"input_ids": ids, "loss_mask": mask}).save_to_disk(str(path))
    return path


def bench_model(kind: str, a, root: Path) -> dict:
    from transformers import AutoConfig

    from speculators.layers import resolve_layer_ids

    vpath = build_verifier(kind, root / f"verifier-{kind}")
    kind = kind.split("=")[0]
    vconf = AutoConfig.from_pretrained(vpath)
    prepared = write_prepared(root / f"prepared-{kind}", vconf.vocab_size, a.samples, a.seq_len)
    layer_ids = resolve_layer_ids(None, vconf.num_hidden_layers, True)
    out: dict = {"verifier": kind, "hidden_size": vconf.hidden_size, "num_layers": vconf.num_hidden_layers,
                 "vocab": vconf.vocab_size, "samples": a.samples, "seq_len": a.seq_len, "backend": a.backends,
                 "runs": [], "params": None}
    for backend in a.backends.split(","):
        for dtype in a.dtypes.split(","):
            out["runs"].append(bench_backend(backend, dtype, kind, a, root, vpath, vconf, prepared, layer_ids, out))
    return out


def bench_backend(backend, dtype, kind, a, root, vpath, vconf, prepared, layer_ids, out) -> dict:
    """One backend in one compute dtype: the generator alone, then `run_datagen` end to end once per
    storage dtype (--hidden-states-dtypes). The vLLM backend's server is started once (its start-up
    timed apart) and reused by the end-to-end runs through $SPECULATORS_VLLM_ENDPOINT."""
    import os

    from speculators.datagen.base import GeneratorSpec, create_generator
    from speculators.datagen.runner import DatagenConfig, run_datagen
    from speculators.datagen.vllm_backend import ENDPOINT_ENV

    device = a.device if backend == "transformers" else "auto"
    spec = GeneratorSpec(model_path=str(vpath), layer_ids=layer_ids, device=device, dtype=dtype)
    t0 = time.perf_counter()
    gen = create_generator(backend, spec)
    startup = time.perf_counter() - t0
    saved_env = os.environ.get(ENDPOINT_ENV)
    try:
        if out["params"] is None and hasattr(gen, "model"):
            out["params"] = sum(p.numel() for p in gen.model.parameters())
        rows = [torch.randint(5, vconf.vocab_size, (a.seq_len,)).tolist() for _ in range(a.batch_size)]
        gen.generate(rows[:1])  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            gen.generate(rows)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if backend == "vllm":
            os.environ[ENDPOINT_ENV] = gen.endpoint  # end to end on the running server
        else:
            gen.close()
        fwd_tps = a.batch_size * a.seq_len / statistics.median(times)
        storage_runs = {}
        for storage in a.hidden_states_dtypes.split(","):
            e2e = []
            for rep in range(a.repeats):
                outdir = root / f"out-{kind}-{backend}-{dtype}-{storage}-{rep}"
                res = run_datagen(DatagenConfig(
                    target_model_path=str(vpath), train_data_path=str(prepared), output_dir=str(outdir),
                    batch_size=a.batch_size, backend=backend, device=device, dtype=dtype,
                    hidden_states_dtype=storage,
                ))
                e2e.append({"seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "generated": res.generated,
                            "disk_bytes": dir_bytes(outdir)})
                shutil.rmtree(outdir, ignore_errors=True)
            best = max(e2e, key=lambda r: r["tokens_per_s"])
            storage_runs[storage] = {"end2end_tokens_per_s": best["tokens_per_s"],
                                     "end2end_all": [r["tokens_per_s"] for r in e2e],
                                     "disk_bytes_per_token": best["disk_bytes"] / (a.samples * a.seq_len)}
    finally:
        gen.close()
        if saved_env is None:
            os.environ.pop(ENDPOINT_ENV, None)
        else:
            os.environ[ENDPOINT_ENV] = saved_env
    n_params = out["params"]
    # 2 * params FLOPs per token for the forward (embedding lookups excluded, lm_head skipped)
    flops_tok = 2 * (n_params - 2 * vconf.vocab_size * vconf.hidden_size) if n_params else None
    first = storage_runs[a.hidden_states_dtypes.split(",")[0]]
    run = {"backend": backend, "dtype": dtype, "batch_size": a.batch_size, "startup_s": startup,
           "forward_tokens_per_s": fwd_tps, "forward_s_all": times,
           "end2end_tokens_per_s": first["end2end_tokens_per_s"], "end2end_all": first["end2end_all"],
           "disk_bytes_per_token": first["disk_bytes_per_token"], "storage": storage_runs,
           "forward_tflops": flops_tok * fwd_tps / 1e12 if flops_tok else None}
    log(f"datagen {kind} {backend} {dtype}: start-up {startup:.1f}s, forward {fmt(fwd_tps)} tokens/s, end-to-end "
        + ", ".join(f"{k} {fmt(v['end2end_tokens_per_s'])} tokens/s ({fmt(v['disk_bytes_per_token'])} B/token)"
                    for k, v in storage_runs.items()))
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backends", "--backend", dest="backends", default="transformers",
                    help="comma-separated: transformers,vllm (vllm: a CUDA or the CPU build of vLLM)")
    ap.add_argument("--hidden-states-dtypes", default="bf16",
                    help="comma-separated storage dtypes timed end to end: bf16,fp8")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--name", default="datagen")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-datagen-", dir=a.tmp))
    try:
        results = {m.split("=")[0]: bench_model(m, a, root) for m in [x.strip() for x in a.models.split(",") if x.strip()]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    payload = {"models": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    lines = ["| verifier | params | backend | dtype | batch x seq | start-up s | forward tokens/s | "
             "end-to-end tokens/s (storage) | disk B/token (storage) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in payload["models"].items():
        for run in r["runs"]:
            storage = run.get("storage") or {"bf16": run}  # results from before storage dtypes: bf16
            e2e = " / ".join(f"{fmt(v['end2end_tokens_per_s'])} ({k})" for k, v in storage.items())
            disk = " / ".join(f"{fmt(v['disk_bytes_per_token'])} ({k})" for k, v in storage.items())
            startup = run.get("startup_s")
            lines.append(f"| {m} (H={r['hidden_size']}, {r['num_layers']} layers) | {fmt(r['params'] or 0)} | "
                         f"{run.get('backend', r.get('backend'))} | {run['dtype']} | {run['batch_size']} x {r['seq_len']} | "
                         f"{fmt(startup) if startup is not None else '-'} | {fmt(run['forward_tokens_per_s'])} | "
                         f"{e2e} | {disk} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
