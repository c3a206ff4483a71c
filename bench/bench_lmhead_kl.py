"""Before/after for the draft lm_head + KL (speculators/train/lm_head_kl.py): eager, fused, chunked.

For each case it times forward+backward of one TTT step's "draft lm_head -> KL to the
verifier" on N rows and measures memory two ways: the bytes autograd saves between
forward and backward beyond the inputs (exact, via saved_tensors_hooks) and the
process's peak memory growth during forward+backward (each variant in a fresh process;
CPU: sampled RSS, GPU: torch.cuda.max_memory_allocated). Fused and chunked are checked
against eager (KL, argmax, both gradients).

`--objective-cases` runs our whole TTT objective (draft unrolled, loss, backward) for each
loss implementation and reports what it holds for backward, every storage counted once.
`--saved-cases` adds the saved-bytes figure for sizes too big to run here (e.g. the 8B
shape at 8192 rows), computed on the meta device: exact shapes and dtypes, no data and
no arithmetic. bf16 there stands for autocast (inputs given in bf16).

    python bench/bench_lmhead_kl.py --cases small:2048,llama8b:1024 --saved-cases llama8b:8192
"""

from __future__ import annotations

import argparse
import contextlib
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
from torch import nn  # noqa: E402

from common import RssSampler, fmt, log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402

VARIANTS = ("eager", "fused", "chunked")


def _inputs(shape, n: int, device: str, dtype=torch.float32):
    """hidden [N, H], lm_head [V, H], target log-probs [N, V], rows [N]."""
    head = nn.Linear(shape.hidden_size, shape.draft_vocab, bias=False, device=device, dtype=dtype)
    if device == "meta":
        h = torch.empty(n, shape.hidden_size, device=device, dtype=dtype)
        t = torch.empty(n, shape.draft_vocab, device=device)
        return h, head, t, torch.arange(n, device=device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, shape.hidden_size, generator=g).to(device, dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(shape.draft_vocab, shape.hidden_size, generator=g) * (4.0 / shape.hidden_size**0.5))
    t = torch.log_softmax(torch.randn(n, shape.draft_vocab, generator=g) * 3, dim=-1).to(device)
    return h, head, t, torch.arange(n, device=device)


def _fwd_bwd(variant: str, h, head, t, rows, chunk: int, autocast: bool):
    from speculators.train.lm_head_kl import lm_head_kl

    ctx = torch.autocast(h.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss, kl, pred = lm_head_kl(h, head, t, rows, 1.0, variant, chunk)
    loss.backward()
    return kl, pred


def _saved_bytes(variant, h, head, t, rows, chunk, autocast) -> int:
    inputs = {x.untyped_storage().data_ptr() for x in (h, head.weight, t, rows)} if h.device.type != "meta" else set()
    input_ids = {id(x) for x in (h, head.weight, t, rows)}
    saved = [0]

    def pack(x):  # what autograd keeps beyond the inputs themselves (and views of them, e.g. weight.t())
        if id(x) in input_ids or id(x._base) in input_ids or (inputs and x.untyped_storage().data_ptr() in inputs):
            return x
        saved[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _fwd_bwd(variant, h, head, t, rows, chunk, autocast)
    return saved[0]


def worker(a) -> dict:
    """One variant, one case, in this (fresh) process."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = a.precision == "bf16"
    shape = get_shape(a.shape)
    h, head, t, rows = _inputs(shape, a.rows, device)
    h.requires_grad_(True)
    _fwd_bwd(a.variant, h, head, t, rows, a.chunk, autocast)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times, saved = [], 0
    with RssSampler(0.002) as rss:
        for i in range(a.repeats):
            h.grad = head.weight.grad = None
            t0 = time.perf_counter()
            if i == 0:
                saved = _saved_bytes(a.variant, h, head, t, rows, a.chunk, autocast)
            else:
                kl, pred = _fwd_bwd(a.variant, h, head, t, rows, a.chunk, autocast)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"variant": a.variant, "shape": a.shape, "rows": a.rows, "chunk": a.chunk, "precision": a.precision,
           "device": device, "seconds_median": statistics.median(times), "seconds_all": times,
           "saved_for_backward_bytes": saved, "rss_growth_mib": rss.peak - rss.base}
    if device == "cuda":
        out["cuda_peak_over_inputs_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    if a.check:
        got = _grads(a.variant, h, head, t, rows, a.chunk, autocast)
        ref = _grads("eager", h, head, t, rows, a.chunk, autocast)
        out["max_abs_diff"] = {"kl": float((got[0] - ref[0]).abs().max()),
                               "grad_h": float((got[2] - ref[2]).abs().max()),
                               "grad_w": float((got[3] - ref[3]).abs().max()),
                               "argmax_equal": bool(torch.equal(got[1], ref[1]))}
    return out


def _grads(variant, h, head, t, rows, chunk, autocast):
    h.grad = head.weight.grad = None
    kl, pred = _fwd_bwd(variant, h, head, t, rows, chunk, autocast)
    return kl, pred, h.grad.clone(), head.weight.grad.clone()


def saved_on_meta(shape_name: str, rows: int, chunk: int, precision: str) -> dict[str, int]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = {}
    for variant in VARIANTS:
        h, head, t, r = _inputs(get_shape(shape_name), rows, "meta", dtype)
        h.requires_grad_(True)
        out[variant] = _saved_bytes(variant, h, head, t, r, chunk, autocast=False)
    return out


def _objective(shape, seq: int, impl: str, chunk: int):
    """Our TTTObjective for `shape` with random weights and a one-row packed batch of `seq` tokens."""
    from ours_runner import draft_config

    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.objective import TTTObjective, step_token_counts
    from speculators.train.verifier import VerifierHead

    torch.manual_seed(0)
    draft = Eagle3DraftModel(draft_config(shape))
    draft.embed_tokens.weight.requires_grad_(False)
    head = VerifierHead(torch.ones(shape.hidden_size), torch.randn(shape.draft_vocab, shape.hidden_size) * 0.02,
                        shape.rms_norm_eps)
    obj = TTTObjective(draft, head, impl, chunk)
    h = shape.hidden_size
    batch = {
        "hidden_states": torch.randn(1, seq, shape.num_aux_layers * h),
        "verifier_last_hidden_states": torch.randn(1, seq, h),
        "input_ids": torch.randint(0, shape.target_vocab, (1, seq)),
        "document_ids": torch.zeros(1, seq, dtype=torch.long),
        "position_ids": torch.arange(seq)[None],
        "loss_mask": torch.ones(1, seq, dtype=torch.long),
    }
    den = step_token_counts(batch["loss_mask"], batch["document_ids"], shape.ttt_steps)
    return obj, batch, den


def objective_worker(a) -> dict:
    """Whole-objective forward+backward for one loss impl: bytes held for backward (each
    storage once), wall time, RSS growth. Attention here is the CPU masked-SDPA path."""
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = get_shape(a.shape)
    obj, batch, den = _objective(shape, a.rows, a.variant, a.chunk)
    seen: dict[int, int] = {}

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        seen[ptr] = max(seen.get(ptr, 0), x.untyped_storage().nbytes())
        return x

    params = {p.untyped_storage().data_ptr() for p in obj.parameters()} | {
        b.untyped_storage().data_ptr() for b in obj.buffers()}
    params |= {t.untyped_storage().data_ptr() for t in batch.values()}
    times = []
    with RssSampler(0.002) as rss:
        for i in range(max(1, a.repeats)):
            obj.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x) if i == 0 else contextlib.nullcontext():
                loss, _ = obj(batch, shape.ttt_steps, 1.0, den)
            loss.backward()
            times.append(time.perf_counter() - t0)
    held = sum(n for ptr, n in seen.items() if ptr not in params)
    return {"variant": a.variant, "shape": a.shape, "rows": a.rows, "chunk": a.chunk, "loss": float(loss),
            "saved_for_backward_bytes": held, "seconds_median": statistics.median(times), "seconds_all": times,
            "rss_growth_mib": rss.peak - rss.base}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small:2048,llama8b:1024", help="shape:rows list, timed")
    ap.add_argument("--saved-cases", default="llama8b:2048,llama8b:8192", help="shape:rows list, meta device")
    ap.add_argument("--objective-cases", default="", help="shape:seq list: the whole TTT objective, fp32, CPU")
    ap.add_argument("--precisions", default="fp32", help="fp32,bf16 (bf16 = autocast)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--chunk", type=int, default=0, help="rows per chunk; 0: the trainer's automatic choice")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="lmhead_kl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="eager", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--objective", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = objective_worker(a) if a.objective else worker(a)
        Path(a.out).write_text(json.dumps(res))
        return res
    results, saved = [], []
    for case in filter(None, a.cases.split(",")):
        shape, rows = case.split(":")
        for precision in a.precisions.split(","):
            for variant in a.variants.split(","):
                out = Path(f"/tmp/bench-lmhead-{os.getpid()}-{variant}.json")
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant, "--shape", shape,
                       "--rows", rows, "--chunk", str(a.chunk), "--repeats", str(a.repeats), "--precision", precision,
                       "--out", str(out)]
                if a.threads:
                    cmd += ["--threads", str(a.threads)]
                if variant != "eager":
                    cmd.append("--check")
                subprocess.run(cmd, check=True, cwd=str(HERE.parent), env=dict(os.environ, PYTHONWARNINGS="ignore"))
                res = json.loads(out.read_text())
                out.unlink()
                results.append(res)
                log(f"{shape} N={rows} {precision} {variant}: {fmt(res['seconds_median'])} s, "
                    f"saved {fmt(res['saved_for_backward_bytes'] / 2**20)} MiB, RSS +{fmt(res['rss_growth_mib'])} MiB"
                    + (f", max diff {res['max_abs_diff']}" if "max_abs_diff" in res else ""))
    objective = []
    for case in filter(None, a.objective_cases.split(",")):
        shape, rows = case.split(":")
        for variant in a.variants.split(","):
            out = Path(f"/tmp/bench-lmhead-obj-{os.getpid()}-{variant}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--objective", "--variant", variant,
                   "--shape", shape, "--rows", rows, "--chunk", str(a.chunk), "--repeats", str(a.repeats),
                   "--out", str(out)] + (["--threads", str(a.threads)] if a.threads else [])
            subprocess.run(cmd, check=True, cwd=str(HERE.parent), env=dict(os.environ, PYTHONWARNINGS="ignore"))
            res = json.loads(out.read_text())
            out.unlink()
            objective.append(res)
            log(f"objective {shape}@{rows} {variant}: {fmt(res['seconds_median'])} s, held for backward "
                f"{fmt(res['saved_for_backward_bytes'] / 2**20)} MiB, RSS +{fmt(res['rss_growth_mib'])} MiB, loss {res['loss']:.6g}")
    for case in filter(None, a.saved_cases.split(",")):
        shape, rows = case.split(":")
        for precision in ("fp32", "bf16"):
            saved.append({"shape": shape, "rows": int(rows), "precision": precision,
                          "saved_bytes": saved_on_meta(shape, int(rows), a.chunk, precision)})
    payload = {"chunk": a.chunk, "results": results, "saved_meta": saved, "objective": objective}
    path = write_result(a.name, payload)
    print(render(payload))
    log(f"wrote {path}")
    return payload


def _mib(n: int) -> str:
    return f"{n} B" if n < 2**10 else fmt(n / 2**20)


def render(payload: dict) -> str:
    lines = ["| shape | rows | precision | variant | fwd+bwd s | saved for backward MiB | peak memory growth MiB | "
             "max abs diff vs eager (kl, grad_h, grad_w) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        d = r.get("max_abs_diff")
        diff = f"{d['kl']:.1e}, {d['grad_h']:.1e}, {d['grad_w']:.1e}" if d else "-"
        mem = r.get("cuda_peak_over_inputs_mib", r["rss_growth_mib"])
        lines.append(f"| {r['shape']} | {r['rows']} | {r.get('precision', 'fp32')} | {r['variant']} | "
                     f"{fmt(r['seconds_median'])} | {_mib(r['saved_for_backward_bytes'])} | {fmt(mem)} | {diff} |")
    if payload.get("saved_meta"):
        lines += ["", f"saved for backward, computed on the meta device (MiB; chunk rows {payload['chunk'] or 'auto'}):", "",
                  "| shape | rows | precision | " + " | ".join(VARIANTS) + " |", "| --- " * (3 + len(VARIANTS)) + "|"]
        for s in payload["saved_meta"]:
            cells = " | ".join(_mib(s["saved_bytes"][v]) for v in VARIANTS)
            lines.append(f"| {s['shape']} | {s['rows']} | {s['precision']} | {cells} |")
    if payload.get("objective"):
        lines += ["", "whole TTT objective (fp32, CPU attention path), forward + backward:", "",
                  "| shape@seq | loss impl | fwd+bwd s | held for backward MiB | peak RSS growth MiB | loss |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in payload["objective"]:
            lines.append(f"| {r['shape']}@{r['rows']} | {r['variant']} | {fmt(r['seconds_median'])} | "
                         f"{_mib(r['saved_for_backward_bytes'])} | {fmt(r['rss_growth_mib'])} | {r['loss']:.6g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
