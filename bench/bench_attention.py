"""Before/after for the fused TTT attention proposal (bench/proposals/ttt_attention_concat.py).

Runs the attention of one draft layer over a full TTT unroll (steps 0..K-1, keys of earlier
steps accumulating) forward and backward with our current `ttt_attention_sdpa` and with
the single-SDPA-call version, on packed rows of several documents; checks both give the
same output and gradients and reports the time of each.

    python bench/bench_attention.py --cases small:512,llama8b:256 --dtypes float32,bfloat16
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


def _document_ids(t: int) -> torch.Tensor:
    """One packed row: documents of 40%, 35% and 20% of the row, then padding."""
    ids = torch.full((1, t), -1, dtype=torch.long)
    a, b, c = int(0.4 * t), int(0.75 * t), int(0.95 * t)
    ids[0, :a], ids[0, a:b], ids[0, b:c] = 0, 1, 2
    return ids


def unroll(fn, qs, ks, vs, ctx, scale, cache):
    keys, values, outs = [], [], []
    for q, k, v in zip(qs, ks, vs):
        keys.append(k)
        values.append(v)
        outs.append(fn(q, keys, values, ctx, scale, cache) if cache is not None else fn(q, keys, values, ctx, scale))
    return outs


def run_case(shape_name: str, t: int, dtype: torch.dtype, repeats: int) -> dict:
    from proposals.ttt_attention_concat import ttt_attention_concat

    from speculators.models.eagle3.attention import ttt_attention_sdpa
    from speculators.models.eagle3.ttt_mask import context_mask

    s = get_shape(shape_name)
    steps, h, hkv, d = s.ttt_steps, s.num_heads, s.num_kv_heads, s.head_dim
    g = torch.Generator().manual_seed(0)
    mk = lambda heads: [torch.randn(1, heads, t, d, generator=g).to(dtype) for _ in range(steps)]  # noqa: E731
    base_q, base_k, base_v = mk(h), mk(hkv), mk(hkv)
    ctx = context_mask(_document_ids(t))
    scale = d**-0.5
    res = {}
    outs = {}
    for name, fn, use_cache in (("current", ttt_attention_sdpa, False), ("concat", ttt_attention_concat, True)):
        times = []
        for rep in range(repeats + 1):
            qs = [x.clone().requires_grad_(True) for x in base_q]
            ks = [x.clone().requires_grad_(True) for x in base_k]
            vs = [x.clone().requires_grad_(True) for x in base_v]
            t0 = time.perf_counter()
            o = unroll(fn, qs, ks, vs, ctx, scale, {} if use_cache else None)
            loss = sum((x.float() * (i + 1)).sum() for i, x in enumerate(o))
            loss.backward()
            dt = time.perf_counter() - t0
            if rep:
                times.append(dt)
        outs[name] = ([x.detach().float() for x in o], [x.grad.float() for x in qs + ks + vs])
        res[name] = {"seconds_median": statistics.median(times), "seconds_all": times}
    (o1, g1), (o2, g2) = outs["current"], outs["concat"]
    # relative to the largest magnitude of the reference tensor (bf16 rounds at ~4e-3)
    res["max_rel_diff_out"] = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(o1, o2))
    res["max_rel_diff_grad"] = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(g1, g2))
    res["speedup"] = res["current"]["seconds_median"] / res["concat"]["seconds_median"]
    res.update({"shape": shape_name, "seq_len": t, "dtype": str(dtype).replace("torch.", ""), "ttt_steps": steps,
                "heads": h, "kv_heads": hkv, "head_dim": d})
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small:512,llama8b:256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="attention")
    a = ap.parse_args(argv)
    results = []
    for case in a.cases.split(","):
        shape, t = case.split(":")
        for dt in a.dtypes.split(","):
            r = run_case(shape, int(t), getattr(torch, dt), a.repeats)
            results.append(r)
            log(f"{shape}@{t} {dt}: current {fmt(r['current']['seconds_median'])} s, concat {fmt(r['concat']['seconds_median'])} s "
                f"({r['speedup']:.2f}x), max rel diff out {r['max_rel_diff_out']:.1e} grad {r['max_rel_diff_grad']:.1e}")
    payload = {"results": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    lines = ["| shape@seq | dtype | current fwd+bwd s | concat fwd+bwd s | speedup | max rel diff out / grad |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        lines.append(f"| {r['shape']}@{r['seq_len']} | {r['dtype']} | {fmt(r['current']['seconds_median'])} | "
                     f"{fmt(r['concat']['seconds_median'])} | {r['speedup']:.2f}x | {r['max_rel_diff_out']:.1e} / {r['max_rel_diff_grad']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
