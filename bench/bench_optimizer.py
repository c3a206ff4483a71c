"""Before/after for the fused-AdamW proposal: one optimizer step (+ grad-norm clip) per variant.

Our trainer builds `torch.optim.AdamW(params, lr, weight_decay)`: on the CPU that is the
per-tensor loop, on CUDA the foreach path. `fused=True` runs one fused kernel per dtype
group (CPU and CUDA). Parameters are the draft's trainable tensors at `--shape`, scaled
down by `--scale` (every dimension divided) so the CPU run fits in memory; times are
also reported per million parameters so they extrapolate.

    python bench/bench_optimizer.py --shape llama8b --scale 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import fmt, log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402


def param_shapes(shape, scale: int) -> list[tuple[int, ...]]:
    h, i = shape.hidden_size // scale, shape.intermediate_size // scale
    q, kv = shape.num_heads * shape.head_dim // scale, shape.num_kv_heads * shape.head_dim // scale
    d = shape.draft_vocab // scale
    return [(h, 3 * h), (q, 2 * h), (kv, 2 * h), (kv, 2 * h), (h, q), (i, h), (i, h), (h, i), (d, h), (h,), (h,), (h,), (h,)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama8b")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="optimizer")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = get_shape(a.shape)
    shapes = param_shapes(shape, a.scale)
    n = sum(torch.Size(s).numel() for s in shapes)
    results = []
    for variant in ("default", "foreach", "fused"):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dev)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dev)
        kw = {} if variant == "default" else {variant: True}
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kw)
        clip_kw = {"foreach": True} if variant != "default" else {}
        opt.step()
        times = []
        for _ in range(a.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0, **clip_kw)
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results.append({"variant": variant, "params": n, "seconds_median": med, "seconds_all": times,
                        "seconds_per_million_params": med / (n / 1e6),
                        "extrapolated_full_shape_s": med / n * shape.param_counts()["trainable"]})
        log(f"{variant}: {fmt(med)} s for {n / 1e6:.0f}M params (clip + AdamW step); "
            f"{fmt(results[-1]['extrapolated_full_shape_s'])} s at the full {shape.name} draft")
        del params, opt
    payload = {"shape": shape.name, "scale": a.scale, "device": dev, "results": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    lines = [f"clip_grad_norm_ + AdamW.step, {payload['shape']} trainable tensors / {payload['scale']} per dim, {payload['device']}",
             "| variant | params | seconds | s per M params | extrapolated to full draft s |", "| --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.0f}M | {fmt(r['seconds_median'])} | "
                     f"{fmt(r['seconds_per_million_params'])} | {fmt(r['extrapolated_full_shape_s'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
