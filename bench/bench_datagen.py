"""Datagen throughput (tokens/s) of the hidden-state backends.

Builds random-weight verifiers locally (no hub access), a prepared dataset of random token
ids of fixed length, and times

* `forward`  - `TransformersGenerator.generate` alone (verifier forward + hook capture), and
* `end2end`  - `speculators.datagen.runner.run_datagen` (read dataset, generate, check,
               write `data_<i>.pt` atomically, data_config.json): what `speculators datagen` does.

Verifiers: `tiny` (speculators.tiny.builders: hidden 64, 8 layers, vocab ~512) and `small`
(random Llama, hidden 1024, 8 layers, 16 heads, vocab 32000; about 0.2B parameters).
`--backend vllm` times the vLLM backend instead (GPU machines with vLLM installed).

    python bench/bench_datagen.py --models tiny,small --samples 16 --seq-len 512
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

    from speculators.datagen.base import GeneratorSpec, create_generator
    from speculators.layers import resolve_layer_ids
    from speculators.datagen.runner import DatagenConfig, run_datagen

    vpath = build_verifier(kind, root / f"verifier-{kind}")
    vconf = AutoConfig.from_pretrained(vpath)
    n_params = None
    prepared = write_prepared(root / f"prepared-{kind}", vconf.vocab_size, a.samples, a.seq_len)
    layer_ids = resolve_layer_ids(None, vconf.num_hidden_layers, True)
    out: dict = {"verifier": kind, "hidden_size": vconf.hidden_size, "num_layers": vconf.num_hidden_layers,
                 "vocab": vconf.vocab_size, "samples": a.samples, "seq_len": a.seq_len, "backend": a.backend, "runs": []}
    for dtype in a.dtypes.split(","):
        spec = GeneratorSpec(model_path=str(vpath), layer_ids=layer_ids, device=a.device, dtype=dtype)
        gen = create_generator(a.backend, spec)
        if n_params is None and hasattr(gen, "model"):
            n_params = sum(p.numel() for p in gen.model.parameters())
        rows = [torch.randint(5, vconf.vocab_size, (a.seq_len,)).tolist() for _ in range(a.batch_size)]
        gen.generate(rows[:1])  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            gen.generate(rows)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        gen.close()
        fwd_tps = a.batch_size * a.seq_len / statistics.median(times)
        e2e = []
        for rep in range(a.repeats):
            outdir = root / f"out-{kind}-{dtype}-{rep}"
            res = run_datagen(DatagenConfig(
                target_model_path=str(vpath), train_data_path=str(prepared), output_dir=str(outdir),
                batch_size=a.batch_size, backend=a.backend, device=a.device, dtype=dtype,
            ))
            e2e.append({"seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "generated": res.generated,
                        "disk_bytes": dir_bytes(outdir)})
            shutil.rmtree(outdir, ignore_errors=True)
        best = max(e2e, key=lambda r: r["tokens_per_s"])
        # 2 * params FLOPs per token for the forward (embedding lookups excluded, lm_head skipped)
        flops_tok = 2 * (n_params - 2 * vconf.vocab_size * vconf.hidden_size) if n_params else None
        run = {"dtype": dtype, "batch_size": a.batch_size, "forward_tokens_per_s": fwd_tps,
               "forward_s_all": times, "end2end_tokens_per_s": best["tokens_per_s"],
               "end2end_all": [r["tokens_per_s"] for r in e2e], "disk_bytes_per_token": best["disk_bytes"] / (a.samples * a.seq_len),
               "forward_tflops": flops_tok * fwd_tps / 1e12 if flops_tok else None}
        out["runs"].append(run)
        log(f"datagen {kind} {dtype}: forward {fmt(fwd_tps)} tokens/s, end-to-end {fmt(best['tokens_per_s'])} tokens/s")
    out["params"] = n_params
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="transformers")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--name", default="datagen")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-datagen-", dir=a.tmp))
    try:
        results = {m: bench_model(m, a, root) for m in [x.strip() for x in a.models.split(",") if x.strip()]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    payload = {"models": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    lines = ["| verifier | params | dtype | batch x seq | forward tokens/s | end-to-end tokens/s | disk B/token |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in payload["models"].items():
        for run in r["runs"]:
            lines.append(f"| {m} (H={r['hidden_size']}, {r['num_layers']} layers) | {fmt(r['params'] or 0)} | {run['dtype']} | "
                         f"{run['batch_size']} x {r['seq_len']} | {fmt(run['forward_tokens_per_s'])} | "
                         f"{fmt(run['end2end_tokens_per_s'])} | {fmt(run['disk_bytes_per_token'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
