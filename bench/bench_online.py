"""The online store's throughput (samples/s it feeds the trainer) against the trainer's consumption.

Starts one real vLLM hidden-states server for the verifier (what `speculators launch-vllm`
starts; the vLLM datagen backend's server code), then reads every row of a prepared dataset
through `speculators.online.store.OnlineSampleStore` the way the trainer does (`prefetch(order)`
once, then `load(i)` in order), with

* ``generate``: every sample requested from the server (``--on-generate delete``), and
* ``cache``: the first pass requests and caches (bf16 or fp8, ``--hidden-states-dtype``), the
  second pass reads the cache from disk (hybrid training's later epochs).

The trainer's consumption is read from a `speculators train` run on the same data on the same
machine (``--train-metrics`` = its ``metrics.jsonl``: ``train/tokens_per_s`` of its steps),
turned into samples/s with the dataset's mean sample length. The store keeps up when its
samples/s is at least the trainer's.

    python bench/bench_online.py --verifier DEMO/verifier --prepared DEMO/prepared \\
        --train-metrics RUN/metrics.jsonl --max-samples 128 --name online
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import fmt, log, write_result  # noqa: E402


def trainer_tokens_per_s(metrics: Path) -> list[float]:
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("type") != "train" or int(rec.get("step", 0)) <= 1:
            continue  # the first step includes start-up
        value = (rec.get("metrics") or {}).get("tokens_per_s")
        if value:
            out.append(float(value))
    return out


class _Rows:
    """The first `n` rows of a prepared dataset (PreparedRows' interface)."""

    def __init__(self, rows, n: int):
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return self.n

    def get(self, i: int):
        return self.rows.get(i)

    def lengths(self) -> list[int]:
        return self.rows.lengths()[: self.n]


def time_pass(store) -> dict:
    order = list(range(len(store)))
    store.prefetch(order)
    t0 = time.perf_counter()
    tokens = 0
    for i in order:
        tokens += int(store.load(i)["input_ids"].shape[0])
    seconds = time.perf_counter() - t0
    return {"samples": len(order), "tokens": tokens, "seconds": seconds,
            "samples_per_s": len(order) / seconds, "tokens_per_s": tokens / seconds, "stats": dict(store.stats)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verifier", required=True)
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--train-metrics", required=True, help="metrics.jsonl of a train run on the same data")
    ap.add_argument("--max-samples", type=int, default=128)
    ap.add_argument("--prefetch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--hidden-states-dtypes", default="bf16,fp8")
    ap.add_argument("--name", default="online")
    a = ap.parse_args(argv)

    from speculators.datagen.base import GeneratorSpec
    from speculators.datagen.vllm_backend import VllmGenerator
    from speculators.layers import resolve_layer_ids
    from speculators.datagen.runner import read_model_shape
    from speculators.online.store import OnlineConfig, OnlineSampleStore, PreparedRows

    num_layers, hidden = read_model_shape(a.verifier)
    layer_ids = resolve_layer_ids(None, num_layers, True)
    rows = PreparedRows.from_path(a.prepared)
    n = min(a.max_samples, len(rows))
    sub = _Rows(rows, n)
    mean_len = statistics.mean(sub.lengths())
    t0 = time.perf_counter()
    server = VllmGenerator(GeneratorSpec(model_path=a.verifier, layer_ids=layer_ids, device="auto", dtype="auto"))
    startup = time.perf_counter() - t0
    root = Path(tempfile.mkdtemp(prefix="bench-online-"))
    result: dict = {"verifier": a.verifier, "hidden_size": hidden, "layer_ids": layer_ids, "samples": n,
                    "mean_tokens_per_sample": mean_len, "prefetch": a.prefetch, "workers": a.workers,
                    "server_startup_s": startup, "modes": {}}
    try:
        def store(**kw):
            cfg = OnlineConfig(endpoint=server.endpoint, layer_ids=layer_ids, prefetch_depth=a.prefetch,
                               workers=a.workers, hidden_size=hidden, num_hidden_layers=num_layers, **kw)
            return OnlineSampleStore(sub, cfg)  # type: ignore[arg-type]

        s = store()
        s.load(0)  # warm-up request
        s.close()
        s = store()
        result["modes"]["generate"] = time_pass(s)
        s.close()
        for storage in a.hidden_states_dtypes.split(","):
            cache = root / f"cache-{storage}"
            s = store(hidden_states_path=str(cache), on_generate="cache", store_dtype=storage)
            first = time_pass(s)
            s.close()
            s = store(hidden_states_path=str(cache), on_generate="cache", store_dtype=storage)
            second = time_pass(s)
            s.close()
            files = list(cache.glob("data_*.pt"))
            result["modes"][f"cache {storage}: first pass (server, cached)"] = first
            result["modes"][f"cache {storage}: later epochs (disk)"] = second
            result["modes"][f"cache {storage}: later epochs (disk)"]["disk_bytes_per_token"] = (
                sum(p.stat().st_size for p in files) / first["tokens"])
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)
    tps = trainer_tokens_per_s(Path(a.train_metrics))
    if tps:
        med = statistics.median(tps)
        result["trainer"] = {"metrics": a.train_metrics, "steps": len(tps), "tokens_per_s_median": med,
                             "samples_per_s": med / mean_len}
    for mode, r in result["modes"].items():
        log(f"online {mode}: {fmt(r['samples_per_s'])} samples/s ({fmt(r['tokens_per_s'])} tokens/s)")
    if "trainer" in result:
        log(f"trainer consumes {fmt(result['trainer']['samples_per_s'])} samples/s")
    path = write_result(a.name, result)
    print(render(result))
    log(f"wrote {path}")
    return result


def render(r: dict) -> str:
    trainer = r.get("trainer", {}).get("samples_per_s")
    lines = [f"verifier H={r['hidden_size']}, layers {r['layer_ids']}, {r['samples']} samples of "
             f"{fmt(r['mean_tokens_per_sample'])} tokens on average, prefetch {r['prefetch']}, {r['workers']} "
             f"request threads; vLLM server start-up {fmt(r['server_startup_s'])} s", "",
             "| source | samples/s | tokens/s | vs trainer | disk B/token |", "| --- | --- | --- | --- | --- |"]
    for mode, m in r["modes"].items():
        ratio = f"{m['samples_per_s'] / trainer:.2f}x" if trainer else "-"
        disk = fmt(m["disk_bytes_per_token"]) if "disk_bytes_per_token" in m else "-"
        lines.append(f"| {mode} | {fmt(m['samples_per_s'])} | {fmt(m['tokens_per_s'])} | {ratio} | {disk} |")
    if trainer:
        t = r["trainer"]
        lines.append(f"| trainer consumption (`speculators train`, median of {t['steps']} steps) | {fmt(trainer)} | "
                     f"{fmt(t['tokens_per_s_median'])} | 1.00x | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
