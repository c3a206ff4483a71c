"""Before/after for the chunked lm_head + KL proposal (bench/proposals/chunked_lm_head_kl.py).

For each shape it times forward+backward of one TTT step's "draft lm_head -> KL to the
verifier" on N rows, checks the two give the same KL and gradients, and measures memory
two ways: the bytes autograd saves between forward and backward beyond the
inputs themselves (exact, via saved_tensors_hooks) and the process's peak RSS growth during forward+backward (each
variant in a fresh process; GPU: torch.cuda.max_memory_allocated).

    python bench/bench_lmhead_kl.py --cases small:2048,llama8b:1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import RssSampler, fmt, log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402


def _inputs(shape, n: int, device: str):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, shape.hidden_size, generator=g).to(device)
    w = (torch.randn(shape.draft_vocab, shape.hidden_size, generator=g) * (4.0 / shape.hidden_size**0.5)).to(device)
    t = torch.log_softmax(torch.randn(n, shape.draft_vocab, generator=g) * 3, dim=-1).to(device)
    rows = torch.arange(n, device=device)
    return h, w, t, rows


def _run(variant: str, h, w, t, rows, chunk: int):
    from proposals.chunked_lm_head_kl import chunked_lm_head_kl, reference_lm_head_kl

    if variant == "reference":
        kl, pred = reference_lm_head_kl(h, w, t, rows)
    else:
        kl, pred = chunked_lm_head_kl(h, w, t, rows, chunk)
    kl.sum().backward()
    return kl.detach(), pred


def worker(a) -> dict:
    """One variant, one shape, in this (fresh) process."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = get_shape(a.shape)
    h, w, t, rows = _inputs(shape, a.rows, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    saved = [0]
    inputs = {x.untyped_storage().data_ptr() for x in (h, w, t, rows)}

    def pack(x):  # count what autograd keeps beyond the inputs themselves
        if x.untyped_storage().data_ptr() not in inputs:
            saved[0] += x.numel() * x.element_size()
        return x

    _run(a.variant, h, w, t, rows, a.chunk)  # warm-up
    h.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    with RssSampler(0.002) as rss:
        for i in range(a.repeats):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            if i == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    kl, _ = _run(a.variant, h, w, t, rows, a.chunk)
            else:
                kl, _ = _run(a.variant, h, w, t, rows, a.chunk)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"variant": a.variant, "shape": a.shape, "rows": a.rows, "chunk": a.chunk, "device": device,
           "seconds_median": statistics.median(times), "seconds_all": times,
           "saved_for_backward_bytes": saved[0], "rss_growth_mib": rss.peak - rss.base,
           "kl_sum": float(kl.sum()), "grad_h_norm": float(h.grad.norm()), "grad_w_norm": float(w.grad.norm())}
    if device == "cuda":
        out["cuda_peak_over_inputs_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    if a.check:
        from proposals.chunked_lm_head_kl import chunked_lm_head_kl, reference_lm_head_kl

        h2 = h.detach().clone().requires_grad_(True)
        w2 = w.detach().clone().requires_grad_(True)
        k1, p1 = reference_lm_head_kl(h2, w2, t, rows)
        k1.sum().backward()
        h3 = h.detach().clone().requires_grad_(True)
        w3 = w.detach().clone().requires_grad_(True)
        k2, p2 = chunked_lm_head_kl(h3, w3, t, rows, a.chunk)
        k2.sum().backward()
        out["max_abs_diff"] = {"kl": float((k1 - k2).abs().max()), "grad_h": float((h2.grad - h3.grad).abs().max()),
                               "grad_w": float((w2.grad - w3.grad).abs().max()), "argmax_equal": bool((p1 == p2).all())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small:2048,llama8b:1024", help="shape:rows list")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="lmhead_kl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="reference", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = worker(a)
        Path(a.out).write_text(json.dumps(res))
        return res
    results = []
    for case in a.cases.split(","):
        shape, rows = case.split(":")
        for variant in ("reference", "chunked"):
            out = Path(f"/tmp/bench-lmhead-{os.getpid()}-{variant}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant, "--shape", shape,
                   "--rows", rows, "--chunk", str(a.chunk), "--repeats", str(a.repeats), "--out", str(out)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if variant == "chunked":
                cmd.append("--check")
            subprocess.run(cmd, check=True, cwd=str(HERE.parent), env=dict(os.environ, PYTHONWARNINGS="ignore"))
            res = json.loads(out.read_text())
            out.unlink()
            results.append(res)
            log(f"{shape} N={rows} {variant}: {fmt(res['seconds_median'])} s, saved {fmt(res['saved_for_backward_bytes'] / 2**20)} MiB, "
                f"RSS +{fmt(res['rss_growth_mib'])} MiB" + (f", max diff {res['max_abs_diff']}" if "max_abs_diff" in res else ""))
    payload = {"chunk": a.chunk, "results": results}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def render(payload: dict) -> str:
    lines = ["| shape | rows | variant | fwd+bwd s | saved for backward MiB | peak RSS growth MiB | max |diff| (kl, grad_h, grad_w) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        d = r.get("max_abs_diff")
        diff = f"{d['kl']:.1e}, {d['grad_h']:.1e}, {d['grad_w']:.1e}" if d else "-"
        mem = r.get("cuda_peak_over_inputs_mib", r["rss_growth_mib"])
        lines.append(f"| {r['shape']} | {r['rows']} | {r['variant']} (chunk {payload['chunk']}) | {fmt(r['seconds_median'])} | "
                     f"{fmt(r['saved_for_backward_bytes'] / 2**20)} | {fmt(mem)} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
