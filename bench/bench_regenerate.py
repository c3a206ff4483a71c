"""Regeneration throughput, transformers vs vLLM (CPU build here), side by side.

Both backends regenerate the same ShareGPT records with the same verifier
(greedy, same --max-tokens / --max-turns); tokens/s counts generated tokens over
the regeneration's wall time (the vLLM server's start-up is timed separately).
Each backend runs --repeats times (one backend at a time, the server stopped before
the other runs) and the median run is reported: on a shared 2-core machine one run
can be off by 3x either way.
Writes bench/results/regenerate.json (with the machine facts of `common.machine_info`);
`bench/table.py` renders it into bench/results/summary.md.

    python bench/bench_regenerate.py [--model DIR] [--samples 64] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS_DIR, fmt, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="verifier (default: the embedded default verifier)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=["transformers", "vllm"])
    p.add_argument("--repeats", type=int, default=3, help="runs per backend; the median is reported, every run kept")
    p.add_argument("--name", default="regenerate", help="results file <results-dir>/<name>.json")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)

    from contextlib import ExitStack

    from speculators.regenerate.backends import ChatServerBackend, TransformersBackend
    from speculators.regenerate.runner import RegenConfig, regenerate
    from speculators.tiny.default import default_verifier

    model = args.model or str(default_verifier())
    results = {"model": model, "samples": args.samples, "max_tokens": args.max_tokens, "max_turns": 1,
               "max_prompt_tokens": 192, "concurrency": args.concurrency, "repeats": args.repeats,
               "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            with ExitStack() as server:  # one backend at a time: an idle vLLM server must not share the CPUs
                t0 = time.time()
                if name == "transformers":
                    backend = TransformersBackend(model, "cpu")
                else:
                    from transformers import AutoTokenizer

                    from speculators.vllm.regen_server import started_chat_server

                    url = server.enter_context(started_chat_server(model, ["--max-model-len", "2048"], 900.0))
                    backend = ChatServerBackend(url, model, concurrency=args.concurrency,
                                                tokenizer=AutoTokenizer.from_pretrained(model))
                setup_s = time.time() - t0
                runs = []
                for r in range(args.repeats):
                    cfg = RegenConfig(model=model, data=["sharegpt"], output=f"{tmp}/{name}-{r}.jsonl", backend=name,
                                      max_tokens=args.max_tokens, concurrency=args.concurrency,
                                      max_samples=args.samples, max_turns=1, max_prompt_tokens=192)
                    runs.append(regenerate(cfg, backend))
                    print(f"{name} run {r}: {runs[-1].tokens} tokens in {runs[-1].seconds:.1f}s = "
                          f"{runs[-1].tokens_per_s:.1f} tokens/s", flush=True)
            median = sorted(runs, key=lambda x: x.tokens_per_s)[len(runs) // 2]
            row = {**median.as_dict(), "tokens_per_s_runs": [round(x.tokens_per_s, 1) for x in runs],
                   "server_startup_s": 0.0 if name == "transformers" else round(setup_s, 1)}
            row.pop("output", None)
            results["backends"][name] = row
    path = write_result(args.name, results, Path(args.results_dir))  # machine facts (load average included) taken at the end
    print(render(results))
    print(f"written to {path}")
    return 0


BACKEND_LABELS = {
    "vllm": "vLLM (OpenAI chat API, server started by the bench)",
    "transformers": "transformers (one left-padded batch per call)",
}


def render(payload: dict) -> str:
    """The backends side by side: same records, same settings, tokens/s over the regeneration's wall time."""
    rows = payload["backends"]
    lines = [f"verifier {Path(payload['model']).name}: {payload['samples']} ShareGPT records, 1 turn, greedy, "
             f"{payload['max_tokens']} tokens per reply, prompts over {payload['max_prompt_tokens']} tokens "
             f"skipped, {payload['concurrency']} in flight",
             "",
             "| backend | records | tokens | seconds | tokens/s (median) | runs | start-up s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {BACKEND_LABELS.get(name, name)} | {r['written']} | {r['tokens']:,} | {fmt(r['seconds'])} | "
                     f"**{fmt(r['tokens_per_s'])}** | {', '.join(fmt(x) for x in r.get('tokens_per_s_runs', []))} | "
                     f"{fmt(r['server_startup_s']) if r['server_startup_s'] else '-'} |")
    if {"vllm", "transformers"} <= rows.keys() and rows["transformers"]["tokens_per_s"]:
        ratio = rows["vllm"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
        lines += ["", f"vLLM / transformers tokens/s: {ratio:.1f}x"
                      + ("" if rows["vllm"]["tokens"] == rows["transformers"]["tokens"]
                         else " (token counts differ: compare tokens/s only)")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
