"""Training step throughput of our trainer: tokens/s, peak memory, FLOPs, and a time breakdown.

For each draft shape (bench/configs.py) it writes synthetic hidden states of that shape,
runs `bench/ours_runner.py` in a fresh process (so peak memory is this run's alone), and
reports tokens/s (median over steps after warm-up), model FLOPs per step
(`DraftShape.flops_per_step`), achieved TFLOP/s, the fraction of the machine's measured
matmul peak (CPU) or of the GPU's datasheet bf16 dense peak (model FLOPs utilisation),
peak memory (CPU: RSS sampled during the steps; GPU: torch.cuda.max_memory_allocated),
and the per-region breakdown from bench/breakdown.py.

On a CPU the Llama-3.1-8B shape runs at a short sequence (configs.py `cpu_seq_len`) and
few steps; on a GPU pass `--seq-len 2048` / `8192`.

    python bench/bench_train.py --shapes tiny,small --steps 6
    python bench/bench_train.py --shapes llama8b --seq-len 2048 --steps 20   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import RESULTS_DIR, fmt, log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402
from synthetic import write_v1_dataset  # noqa: E402

# Datasheet dense bf16 peaks (no sparsity), FLOP/s.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "L40S": 362e12}


def gpu_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak
    return None


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul: the practical limit for the draft's dense work."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    best = float("inf")
    for _ in range(repeats + 1):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_shape(name: str, seq_len: int | None, steps: int, warmup: int, profile: int, extra: list[str], tmp: str | None,
              timeout: int, rows: int = 1, trace: str | None = None) -> dict:
    on_gpu = torch.cuda.is_available()
    shape = get_shape(name)
    shape = shape.with_seq(seq_len or (shape.seq_len if on_gpu else shape.cpu_seq_len))
    root = Path(tempfile.mkdtemp(prefix=f"bench-train-{name}-", dir=tmp))
    try:
        n = int((steps + warmup + profile + 1) * rows / 0.95) + 3
        log(f"{name}: writing {n} samples of {shape.seq_len + 1} tokens (H={shape.hidden_size})")
        write_v1_dataset(root / "data", n, shape.seq_len + 1, shape.hidden_size, shape.target_vocab, seed=0)
        out = root / "result.json"
        cmd = [sys.executable, str(HERE / "ours_runner.py"), "--data", str(root / "data"), "--shape", name,
               "--seq-len", str(shape.seq_len), "--steps", str(steps + warmup), "--out", str(out),
               "--rows", str(rows), "--sync-warmup", str(warmup)]
        if profile:
            cmd += ["--profile", str(profile)]
            if trace:
                cmd += ["--trace", trace]
        cmd += extra
        proc = subprocess.run(cmd, cwd=str(HERE.parent), capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
        res = json.loads(out.read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    secs = [s["step_s"] for s in res["steps"][warmup:]]
    tokens = res["steps"][-1]["tokens"]
    tps = tokens / statistics.median(secs)
    flops = shape.flops_per_step(int(tokens), train_lm_head=res["options"]["lm_head_trainable"],
                                 attn_tokens=shape.seq_len)  # each packed row attends within itself
    entry = {
        "shape": shape.to_dict(),
        "seq_len": shape.seq_len,
        "device": res["options"]["device"],
        "precision": res["options"]["precision"],
        "proposals": {k: res["options"].get(k) for k in ("fused_adamw",)},
        "loss_impl": res["options"].get("loss_impl", "eager"),
        "attn": res["options"]["attn"],
        "steps_timed": len(secs),
        "tokens_per_step": tokens,
        "rows": rows,
        "sync_every": res["options"].get("sync_every"),
        "step_s_median": statistics.median(secs),
        "step_s_all": secs,
        "tokens_per_s": tps,
        "flops_per_step": flops,
        "achieved_tflops": flops["total"] * tps / tokens / 1e12,
        "trainable_params": res["trainable_params"],
        "train_peak_rss_mib": res.get("train_peak_rss_mib"),
        "peak_rss_mib": res.get("peak_rss_mib"),
        "cuda_max_memory_allocated_mib": res.get("cuda_max_memory_allocated_mib"),
        "loss_first_last": [res["steps"][0]["loss"], res["steps"][-1]["loss"]],
        "profile": res.get("profile"),
    }
    return entry


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,small,llama8b")
    ap.add_argument("--seq-len", type=int, default=None, help="override every shape's sequence length")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", type=int, default=2, help="extra instrumented/profiled steps (0: none)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="passed to ours_runner")
    ap.add_argument("--attn", default=None, help="passed to ours_runner (--attn)")
    ap.add_argument("--opt", action="store_true", help="ours_runner --opt: all proposals applied")
    ap.add_argument("--loss-impl", choices=["fused", "chunked", "eager"], default=None, help="passed to ours_runner")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per step (--rows-per-batch)")
    ap.add_argument("--trace", action="store_true",
                    help="keep each shape's profiler trace as bench/results/traces/<name>_<shape>.json.gz")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--name", default="train")
    a = ap.parse_args(argv)
    extra = []
    if a.precision:
        extra += ["--precision", a.precision]
    if a.attn:
        extra += ["--attn", a.attn]
    if a.opt:
        extra += ["--opt"]
    if a.loss_impl:
        extra += ["--loss-impl", a.loss_impl]
    peak_fp32 = matmul_peak(torch.float32)
    peak_bf16 = matmul_peak(torch.bfloat16)
    hw = {"matmul_fp32_tflops": peak_fp32 / 1e12, "matmul_bf16_tflops": peak_bf16 / 1e12, "gpu_datasheet_bf16_tflops": None}
    if gpu_peak():
        hw["gpu_datasheet_bf16_tflops"] = gpu_peak() / 1e12
    log(f"measured matmul peak: fp32 {fmt(hw['matmul_fp32_tflops'])} TFLOP/s, bf16 {fmt(hw['matmul_bf16_tflops'])} TFLOP/s")
    results = {}
    for name in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        trace = None
        if a.trace and a.profile:
            (RESULTS_DIR / "traces").mkdir(parents=True, exist_ok=True)
            trace = str(RESULTS_DIR / "traces" / f"{a.name}_{name}.json.gz")
        entry = run_shape(name, a.seq_len, a.steps, a.warmup, a.profile, extra, a.tmp, a.timeout, a.rows, trace)
        ref = hw["gpu_datasheet_bf16_tflops"] or (hw["matmul_bf16_tflops"] if entry["precision"] == "bf16" else hw["matmul_fp32_tflops"])
        entry["fraction_of_peak"] = entry["achieved_tflops"] / ref if ref else None
        entry["peak_reference"] = "GPU datasheet bf16 dense (MFU)" if hw["gpu_datasheet_bf16_tflops"] else f"measured {entry['precision']} matmul"
        results[f"{name}@{entry['seq_len']}" + (f"x{a.rows}" if a.rows > 1 else "")] = entry
        log(f"{name}@{entry['seq_len']}: {fmt(entry['tokens_per_s'])} tokens/s, step {fmt(entry['step_s_median'])} s, "
            f"{fmt(entry['achieved_tflops'])} TFLOP/s ({fmt(100 * (entry['fraction_of_peak'] or 0))}% of {entry['peak_reference']}), "
            f"peak RSS {fmt(entry['train_peak_rss_mib'])} MiB")
    payload = {"hardware": hw, "runs": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    from breakdown import render as render_profile

    lines = ["| shape@seq | device | precision | loss | proposals | tokens/s | step s | TFLOP/s | % of peak | peak mem MiB | trainable |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, e in payload["runs"].items():
        mem = e.get("cuda_max_memory_allocated_mib") or e.get("train_peak_rss_mib")
        props = ", ".join(k for k, v in (e.get("proposals") or {}).items() if v) or "none"
        lines.append(f"| {key} | {e['device']} | {e['precision']} | {e.get('loss_impl', 'eager')} | {props} | {fmt(e['tokens_per_s'])} | {fmt(e['step_s_median'])} | "
                     f"{fmt(e['achieved_tflops'])} | {fmt(100 * (e['fraction_of_peak'] or 0))}% | {fmt(mem)} | {e['trainable_params']:,} |")
    for key, e in payload["runs"].items():
        if e.get("profile"):
            lines.append(f"\nbreakdown {key}:")
            lines.append(render_profile(e["profile"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
