"""Regeneration throughput, transformers vs vLLM (CPU build here), side by side.

Both backends regenerate the same ShareGPT records with the same verifier
(greedy, same --max-tokens / --max-turns); tokens/s counts generated tokens over
the regeneration's wall time (the vLLM server's start-up is timed separately).
Writes bench/results/regenerate.json.

    python bench/bench_regenerate.py [--model DIR] [--samples 64] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="verifier (default: the embedded default verifier)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=["transformers", "vllm"])
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "regenerate.json"))
    args = p.parse_args()

    from speculators.regenerate.backends import ChatServerBackend, TransformersBackend
    from speculators.regenerate.runner import RegenConfig, regenerate
    from speculators.tiny.default import default_verifier

    model = args.model or str(default_verifier())
    results = {"model": model, "samples": args.samples, "max_tokens": args.max_tokens, "max_turns": 1,
               "max_prompt_tokens": 192, "load_average_at_start": os.getloadavg(),
               "concurrency": args.concurrency, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "torch_threads": None, "backends": {}}
    import torch

    results["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            cfg = RegenConfig(model=model, data=["sharegpt"], output=f"{tmp}/{backend}.jsonl", backend=backend,
                              max_tokens=args.max_tokens, concurrency=args.concurrency,
                              max_samples=args.samples, max_turns=1, max_prompt_tokens=192)
            if backend == "transformers":
                summary = regenerate(cfg, TransformersBackend(model, "cpu"))
                startup = 0.0
            else:
                from speculators.vllm.regen_server import started_chat_server

                t0 = time.time()
                with started_chat_server(model, ["--max-model-len", "2048"], 900.0) as url:
                    startup = time.time() - t0
                    from transformers import AutoTokenizer

                    summary = regenerate(cfg, ChatServerBackend(url, model, concurrency=args.concurrency,
                                                                tokenizer=AutoTokenizer.from_pretrained(model)))
            row = {**summary.as_dict(), "server_startup_s": round(startup, 1)}
            row.pop("output", None)
            results["backends"][backend] = row
            print(f"{backend}: {summary.tokens} tokens in {summary.seconds:.1f}s = {summary.tokens_per_s:.1f} "
                  f"tokens/s (start-up {startup:.0f}s)", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
