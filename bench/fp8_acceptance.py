"""fp8 vs bf16 stored hidden states: bytes per token and acceptance at equal data and steps.

Collects a finished experiment directory (the protocol, as run for docs/benchmarks.md):

    speculators demo --workdir D --regen-backend transformers --no-vllm-eval      # data + verifier
    for dt in bf16 fp8:  speculators datagen ... --output-dir X/hs_$dt --hidden-states-dtype $dt
    for seed in 0 1 2, dt in bf16 fp8:
        speculators train ... --data-path X/hs_$dt --seed $seed --save-path X/ck_${dt}_s$seed  (demo's train args)
        speculators eval --checkpoint X/ck_${dt}_s$seed/checkpoint_best ... --output-json X/eval_${dt}_s$seed.json

then `python bench/fp8_acceptance.py X` writes bench/results/fp8_acceptance.json. fp8 is kept
when its mean acceptance length is within the seed spread: |mean(fp8) - mean(bf16)| <= the
larger max-min over seeds of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import log, write_result  # noqa: E402


def store_bytes(directory: Path) -> dict:
    from speculators.data import data_config as dc

    config = dc.load(directory / "data_config.json") or {}
    tokens = sum(int(v) for v in (config.get("lengths") or {}).values())
    files = sum(p.stat().st_size for p in directory.glob("data_*.pt"))
    hidden, layers = int(config["hidden_size"]), len(config["layer_ids"])
    from speculators.data.hs_quant import bytes_per_token, storage_of

    storage = storage_of(config.get("hidden_states_dtype"), str(directory))
    return {"tokens": tokens, "samples": int(config.get("num_samples") or 0), "hidden_size": hidden,
            "layers": layers, "recorded_dtype": config.get("hidden_states_dtype"),
            "payload_bytes_per_token": bytes_per_token(hidden, layers, storage),
            "disk_bytes_per_token": files / tokens}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    root = Path(a.directory)
    seeds = [int(s) for s in a.seeds.split(",")]
    result: dict = {"seeds": seeds, "note": a.note, "storage": {}}
    for dt in ("bf16", "fp8"):
        evals = [json.loads((root / f"eval_{dt}_s{s}.json").read_text()) for s in seeds]
        lengths = [e["mean_acceptance_length"] for e in evals]
        result["storage"][dt] = {
            **store_bytes(root / f"hs_{dt}"),
            "acceptance_length": lengths,
            "draft_acceptance_rate": [e["draft_acceptance_rate"] for e in evals],
            "per_position": [e["acceptance_rate_per_position"] for e in evals],
            "num_drafts": [e["num_drafts"] for e in evals],
            "mean": statistics.mean(lengths),
            "spread": max(lengths) - min(lengths),
        }
    bf, f8 = result["storage"]["bf16"], result["storage"]["fp8"]
    delta = f8["mean"] - bf["mean"]
    allowed = max(bf["spread"], f8["spread"])
    keep = abs(delta) <= allowed
    result["delta_mean"] = delta
    result["keep"] = keep
    result["verdict"] = (f"fp8 - bf16 mean acceptance length: {delta:+.3f} (seed spread {allowed:.3f}): "
                         + ("within the seed spread, fp8 storage kept" if keep else "outside the seed spread"))
    log(result["verdict"])
    path = write_result("fp8_acceptance", result)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
