"""The GPU figures against issue 24's targets, from the JSON results of `bench/run.sh --gpu`.

    python bench/gpu_targets.py [RESULTS_DIR]

MFU of the 8B-shaped step at seq 2048 (one row, and four rows per step), and at 8192;
ours/public tokens/s in the side-by-side on the same GPU (median of the per-repeat ratios,
with their range) and both peaks of CUDA memory. Targets: MFU >= 30% at 2048 and >= 40% at
8192; ours >= 1.5x the public trainer's tokens/s. Missing results print as "not run".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS_DIR, fmt  # noqa: E402

MFU_TARGETS = {"train_gpu_2048": 0.30, "train_gpu_2048x4": 0.30, "train_gpu_8192": 0.40}
RATIO_TARGET = 1.5


def _load(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluate(directory: Path) -> dict:
    """Each target: the measured figure, the target and whether it is met (None: not run)."""
    rows = []
    for name, target in MFU_TARGETS.items():
        res = _load(directory, name)
        if res is None or not res.get("runs"):
            rows.append({"what": f"MFU {name}", "value": None, "target": target, "met": None})
            continue
        (key, run), = list(res["runs"].items())[:1]
        mfu = run.get("fraction_of_peak")
        gpu = run.get("device", "").startswith("cuda")
        rows.append({"what": f"MFU {key} ({run.get('rows', 1)} row(s)/step)", "value": mfu, "target": target,
                     "met": (mfu >= target) if (mfu is not None and gpu) else None,
                     "tokens_per_s": run.get("tokens_per_s"), "cuda_peak_mib": run.get("cuda_max_memory_allocated_mib"),
                     "device": run.get("device")})
    sbs = _load(directory, "side_by_side_llama8b_gpu")
    if sbs and sbs.get("paired_ratios"):
        key, p = next((k, v) for k, v in sbs["paired_ratios"].items() if k.startswith("ours/"))
        ours, theirs = key.split("/")
        v = sbs["variants"]
        rows.append({"what": f"tokens/s {key}", "value": p["median"], "target": RATIO_TARGET,
                     "met": p["median"] >= RATIO_TARGET, "range": [p["min"], p["max"]],
                     "ours_tokens_per_s": v[ours]["tokens_per_s_median"],
                     "public_tokens_per_s": v[theirs]["tokens_per_s_median"],
                     "ours_cuda_peak_mib": v[ours].get("cuda_peak_mib"),
                     "public_cuda_peak_mib": v[theirs].get("cuda_peak_mib")})
    else:
        rows.append({"what": "tokens/s ours/public (GPU side by side)", "value": None, "target": RATIO_TARGET,
                     "met": None})
    return {"rows": rows}


def render(result: dict) -> str:
    lines = ["| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        pct = r["what"].startswith("MFU")
        val = "not run" if r["value"] is None else (f"{100 * r['value']:.1f}%" if pct else f"{r['value']:.2f}x")
        if r.get("range"):
            val += f" (per repeat {r['range'][0]:.2f}-{r['range'][1]:.2f}; ours {fmt(r['ours_tokens_per_s'])} vs " \
                   f"public {fmt(r['public_tokens_per_s'])} tokens/s; peak CUDA MiB ours " \
                   f"{fmt(r.get('ours_cuda_peak_mib'))} vs public {fmt(r.get('public_cuda_peak_mib'))})"
        elif r["value"] is not None and pct:
            val += f" ({fmt(r.get('tokens_per_s'))} tokens/s, peak CUDA {fmt(r.get('cuda_peak_mib'))} MiB, {r.get('device')})"
        wanted = f">= {100 * r['target']:.0f}%" if pct else f">= {r['target']:.1f}x"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"| {r['what']} | {val} | {wanted} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    result = evaluate(Path(argv[0]) if argv else RESULTS_DIR)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
