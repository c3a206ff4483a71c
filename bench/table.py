"""Print (and write bench/results/summary.md) one report from the JSON results of a run.

    python bench/table.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS_DIR, fmt  # noqa: E402


def _load(directory: Path, prefix: str) -> list[dict]:
    out = []
    for p in sorted(directory.glob(f"{prefix}*.json")):
        if "_try" in p.stem or "smoke" in p.stem:
            continue
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def machine_line(m: dict) -> str:
    return (f"{m.get('timestamp')} | {m.get('cpu', '?')} | nproc {m.get('nproc')} | load avg {m.get('load_avg')} | "
            f"torch threads {m.get('torch_threads')} | torch {m.get('torch')} | "
            f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'} | git {m.get('git', '?')}")


def render_all(directory: Path) -> str:
    import bench_datagen
    import gpu_checks
    import bench_lmhead_kl
    import bench_online
    import bench_optimizer
    import bench_regenerate
    import bench_train
    import side_by_side

    parts: list[str] = ["# Benchmark results", ""]
    machines = []

    sbs = _load(directory, "side_by_side_")
    if sbs:
        parts.append("## Side by side with the public package (same draft, data, steps, machine)")
        for r in sbs:
            parts += ["", "```", side_by_side.render(r), "```"]
            machines.append(("side by side " + r["shape"]["name"], r["machine"]))
    for r in _load(directory, "gpu_checks"):
        parts += ["", "## CUDA checks (bench/gpu_checks.py)", "", gpu_checks.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    train = _load(directory, "train")
    for r in train:
        parts += ["", "## Training step throughput (ours)", "",
                  f"hardware reference: measured matmul fp32 {fmt(r['hardware']['matmul_fp32_tflops'])} TFLOP/s, "
                  f"bf16 {fmt(r['hardware']['matmul_bf16_tflops'])} TFLOP/s"
                  + (f", GPU datasheet bf16 {fmt(r['hardware']['gpu_datasheet_bf16_tflops'])} TFLOP/s" if r["hardware"].get("gpu_datasheet_bf16_tflops") else ""),
                  "", bench_train.render(r)]
        if r.get("note"):
            parts += ["", f"note: {r['note']}"]
        machines.append((r["benchmark"], r["machine"]))
    loads = _load(directory, "dataload")
    if loads:
        parts += ["", "## Data loading (per-sample .pt vs safetensors shards vs the public layout)", "",
                  "| data | layout | warm samples/s | warm MB/s | cold samples/s | cold MB/s | dataset+collate tokens/s | disk B/token |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in loads:
            p = r["params"]
            label = f"H={p['hidden']} x {p['layers']} layers, L={p['seq_len']}, {p['samples']} samples"
            for name, e in r["layouts"].items():
                parts.append(f"| {label} | {name} | {fmt(e['warm']['samples_per_s'])} | {fmt(e['warm']['mb_per_s'])} | "
                             f"{fmt(e['cold']['samples_per_s'])} | {fmt(e['cold']['mb_per_s'])} | "
                             f"{fmt(e.get('dataset_collate_tokens_per_s'))} | {fmt(e['bytes_per_token'])} |")
            machines.append((r["benchmark"], r["machine"]))
    dg = _load(directory, "datagen")
    for r in dg:
        parts += ["", "## Datagen (tokens/s by backend; bytes on disk by --hidden-states-dtype)", "",
                  bench_datagen.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    for r in _load(directory, "online"):
        parts += ["", "## Online store: samples/s it feeds the trainer vs the trainer's consumption", "",
                  bench_online.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    for r in _load(directory, "fp8_acceptance"):
        parts += ["", "## fp8 vs bf16 stored hidden states: acceptance at equal data and steps", "",
                  render_fp8(r)]
        machines.append((r["benchmark"], r["machine"]))
    lk = _load(directory, "lmhead_kl")
    for r in lk:
        parts += ["", "## lm_head + KL: eager vs fused (the default) vs chunked", "", bench_lmhead_kl.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    for r in _load(directory, "regenerate"):
        parts += ["", "## Regeneration throughput (`speculators regenerate`): vLLM CPU vs transformers", "",
                  bench_regenerate.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    for r in _load(directory, "optimizer"):
        parts += ["", "## Proposal: AdamW(fused=True) (before/after)", "", bench_optimizer.render(r)]
        machines.append((r["benchmark"], r["machine"]))
    if machines:
        parts += ["", "## Machines", ""] + [f"- {name}: {machine_line(m)}" for name, m in machines]
    return "\n".join(parts) + "\n"


def render_fp8(r: dict) -> str:
    """The table of bench/results/fp8_acceptance.json (written by bench/fp8_acceptance.py)."""
    lines = ["| stored as | bytes/token (hidden-state payload) | bytes/token (files on disk) | "
             "mean acceptance length per seed | mean | spread (max-min) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, e in r["storage"].items():
        per_seed = " / ".join(f"{v:.3f}" for v in e["acceptance_length"])
        lines.append(f"| {name} | {fmt(e['payload_bytes_per_token'])} | {fmt(e['disk_bytes_per_token'])} | "
                     f"{per_seed} | {e['mean']:.3f} | {e['spread']:.3f} |")
    return "\n".join(lines) + f"\n\n{r['verdict']}"


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR
    text = render_all(directory)
    (directory / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
