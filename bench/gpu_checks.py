"""CUDA correctness checks that the CPU suite cannot run: flex attention with backward, and
FSDP2's bf16 MixedPrecisionPolicy over NCCL.

1. attention: the TTT attention through compiled flex attention (what training uses on CUDA)
   against the dense reference (`ttt_attention_sdpa` in fp32), forward and backward, at the
   Llama-3.1-8B head layout (32 query / 8 KV heads, head_dim 128), packed documents plus
   padding, TTT step 2. In bf16 the flex error is judged against the bf16 reference's own
   error (both round the same inputs), in fp32 against a fixed tolerance. Then the compact
   call of the sparse TTT unroll (only the kept query rows, `query_pos`, padded to T for the static
   compile) against the SDPA compact form in fp32 at two kept-row counts, and its bf16 time.
2. fsdp: the draft at the 8B shape trained for a few steps in bf16 twice from the same init
   and batches: once plain, once wrapped by `speculators.train.distributed.shard` (FSDP2 per
   decoder layer and root, bf16 policy) in a one-rank NCCL group. Losses must agree within
   bf16 rounding, the decoder layer must see bf16 weights in forward, and the stored weights
   and their gradients must stay fp32.

    python bench/gpu_checks.py --name gpu_checks          # writes bench/results/gpu_checks.json
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
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import log, write_result  # noqa: E402


def _doc_ids(b: int, t: int, device) -> torch.Tensor:
    """Packed documents of uneven lengths, the last 5% padding (-1)."""
    ids = torch.full((b, t), -1, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    for row in range(b):
        pos, doc = 0, 0
        end = int(t * 0.95)
        while pos < end:
            n = int(torch.randint(64, 900, (1,), generator=g))
            ids[row, pos:min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return ids


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_attention(seq: int = 2048, steps: int = 3, device: str = "cuda") -> dict:
    from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa
    from speculators.models.eagle3.ttt_mask import context_mask

    dev = torch.device(device)
    b, h, hkv, d = 2, 32, 8, 128
    scale = d ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    q0 = torch.randn(b, h, seq, d, device=dev, generator=g)
    k0 = [torch.randn(b, hkv, seq, d, device=dev, generator=g) for _ in range(steps)]
    v0 = [torch.randn(b, hkv, seq, d, device=dev, generator=g) for _ in range(steps)]
    up = torch.randn(b, h, seq, d, device=dev, generator=g)
    doc = _doc_ids(b, seq, dev)
    ctx = context_mask(doc)

    def run(fn, dtype):
        # clone: .to() of an fp32 tensor to fp32 returns the tensor itself, and a leaf must be new
        q = q0.to(dtype).clone().requires_grad_()
        ks = [k.to(dtype).clone().requires_grad_() for k in k0]
        vs = [v.to(dtype).clone().requires_grad_() for v in v0]
        out = fn(q, ks, vs)
        (out.float() * up).sum().backward()
        return [out.detach().float(), q.grad.float()] + [t.grad.float() for t in ks + vs]

    sdpa = lambda q, ks, vs: ttt_attention_sdpa(q, ks, vs, ctx, scale)  # noqa: E731
    flex = lambda q, ks, vs: ttt_attention_flex(q, ks, vs, doc, scale, block_mask_cache={})  # noqa: E731
    names = ["out", "dq"] + [f"dk{i}" for i in range(steps)] + [f"dv{i}" for i in range(steps)]
    ref = run(sdpa, torch.float32)

    def rel_err(got):
        return {n: float((a - r).abs().max() / r.abs().max().clamp_min(1e-12)) for n, a, r in zip(names, got, ref)}

    res = {"seq": seq, "ttt_steps": steps, "heads": h, "kv_heads": hkv, "head_dim": d}
    res["flex_fp32_vs_ref"] = rel_err(run(flex, torch.float32))
    res["sdpa_bf16_vs_ref"] = rel_err(run(sdpa, torch.bfloat16))
    res["flex_bf16_vs_ref"] = rel_err(run(flex, torch.bfloat16))

    def timed(fn, dtype, reps=10 if dev.type == "cuda" else 1):
        run(fn, dtype)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            run(fn, dtype)
        _sync(dev)
        return (time.perf_counter() - t0) / reps * 1e3

    res["fwd_bwd_ms_bf16"] = {"flex": timed(flex, torch.bfloat16), "sdpa_reference": timed(sdpa, torch.bfloat16)}
    worst_fp32 = max(res["flex_fp32_vs_ref"].values())
    worst_ratio = max(res["flex_bf16_vs_ref"][n] / max(res["sdpa_bf16_vs_ref"][n], 1e-6) for n in names)
    res["worst_fp32_rel"] = worst_fp32
    res["worst_bf16_err_ratio_flex_over_sdpa"] = worst_ratio
    res["sparse"] = _check_sparse_attention(q0, k0, v0, up, doc, scale, res["fwd_bwd_ms_bf16"]["flex"])
    res["passed"] = worst_fp32 < 1e-3 and worst_ratio < 3.0 and res["sparse"]["passed"]
    log(f"attention: fp32 worst rel {worst_fp32:.2e}; bf16 flex/sdpa error ratio {worst_ratio:.2f}; "
        f"fwd+bwd ms {res['fwd_bwd_ms_bf16']}; sparse {res['sparse']}")
    return res


def _kept_rows(doc: torch.Tensor, steps: int) -> torch.Tensor:
    """`ttt_query_rows` for a loss mask that leaves the first third of every document unmasked."""
    from speculators.models.eagle3.ttt_mask import ttt_query_rows

    b, t = doc.shape
    mask = torch.zeros_like(doc)
    for row in range(b):
        for d in doc[row].unique().tolist():
            if d < 0:
                continue
            at = (doc[row] == d).nonzero().squeeze(1)
            mask[row, at[len(at) // 3:]] = 1
    return ttt_query_rows(mask, doc, steps)


def _check_sparse_attention(q0, k0, v0, up, doc, scale, dense_ms: float) -> dict:
    """The compact flex call (kept query rows only: `Eagle3DraftModel.iter_ttt(query_rows=...)` on CUDA)
    against the SDPA compact form, fwd + bwd in fp32, at two kept-row counts (padded to T, one
    static compile serves both), and its bf16 time against the dense flex call over
    every row (`dense_ms`, measured by the caller; TTT step `len(k0) - 1`)."""
    from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa
    from speculators.models.eagle3.model import gather_rows
    from speculators.models.eagle3.ttt_mask import context_mask

    dev = q0.device
    out: dict = {"kept_rows": [], "fp32_vs_ref": []}
    full = _kept_rows(doc, len(k0))
    for rows in (full, full[:, :-7]):
        n = rows.shape[1]
        idx = rows.clamp(min=0)[:, None, :, None]
        qs = q0.gather(2, idx.expand(-1, q0.shape[1], -1, q0.shape[3]))
        real = (rows >= 0)[:, None, :, None]
        ups = up.gather(2, idx.expand(-1, up.shape[1], -1, up.shape[3])) * real  # pads (-1) get no gradient
        ks = [k0[0]] + [k[:, :, :n] for k in k0[1:]]
        vs = [v0[0]] + [v[:, :, :n] for v in v0[1:]]
        ctx = gather_rows(context_mask(doc), rows)

        def run(fn, dtype, qs=qs, ks=ks, vs=vs, ups=ups, real=real):
            q = qs.to(dtype).clone().requires_grad_()
            kk = [k.to(dtype).clone().requires_grad_() for k in ks]
            vv = [v.to(dtype).clone().requires_grad_() for v in vs]
            o = fn(q, kk, vv)
            (o.float() * ups).sum().backward()
            return [o.detach().float() * real, q.grad.float()] + [t.grad.float() for t in kk + vv]

        sparse = lambda q, kk, vv, rows=rows: ttt_attention_flex(q, kk, vv, doc, scale, {}, query_pos=rows)  # noqa: E731
        ref = run(lambda q, kk, vv, ctx=ctx: ttt_attention_sdpa(q, kk, vv, ctx, scale), torch.float32)
        got = run(sparse, torch.float32)
        out["kept_rows"].append(n)
        out["fp32_vs_ref"].append(max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-12))
                                      for a, r in zip(got, ref)))
        if rows is full:
            reps = 10 if dev.type == "cuda" else 1
            run(sparse, torch.bfloat16)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                run(sparse, torch.bfloat16)
            _sync(dev)
            out["fwd_bwd_ms_bf16"] = {"sparse": (time.perf_counter() - t0) / reps * 1e3}
    out["fwd_bwd_ms_bf16"]["dense_all_rows"] = dense_ms
    out["seq"] = q0.shape[2]
    out["passed"] = max(out["fp32_vs_ref"]) < 1e-3
    return out


def check_fsdp(seq: int = 2048, steps: int = 6, shape_name: str = "llama8b", device: str = "cuda") -> dict:
    import torch.distributed as dist

    from configs import get_shape
    from ours_runner import build_trainer, iter_steps
    from synthetic import write_v1_dataset
    from speculators.train.distributed import DistInfo, shard
    from speculators.train.losses import summarize
    from speculators.train.schedule import build_scheduler

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    shape = get_shape(shape_name, seq)
    root = Path(tempfile.mkdtemp(prefix="gpu-fsdp-"))
    write_v1_dataset(root / "data", int(steps / 0.9) + 4, seq + 1, shape.hidden_size, shape.target_vocab, seed=0)

    def train(fsdp: bool) -> dict:
        tr, _ = build_trainer(shape, str(root / "data"), seq, 1e-4, 0, "auto", "bf16", device, epochs=1)
        seen, grad_dtypes = [], set()
        if fsdp:
            # A one-rank NCCL group; the info says "distributed" so shard applies FSDP2 as under torchrun.
            shard(tr.objective, DistInfo(rank=0, world_size=2, device=tr.device), bf16=True)
            tr.params = [p for p in tr.objective.parameters() if p.requires_grad]
            tr.optimizer = torch.optim.AdamW(tr.params, lr=1e-4, weight_decay=0.0, foreach=True)
            tr.scheduler = build_scheduler(tr.optimizer, tr.data.total_steps, 0, "none")
            tr.draft.layers[0].register_forward_pre_hook(
                lambda m, a: seen.append(m.self_attn.q_proj.weight.dtype) if hasattr(m, "self_attn") else None)
            for p in tr.params:
                p.register_post_accumulate_grad_hook(lambda p: grad_dtypes.add(str(p.grad.dtype)))
        else:
            tr.optimizer = torch.optim.AdamW(tr.params, lr=1e-4, weight_decay=0.0, foreach=True)
            tr.scheduler = build_scheduler(tr.optimizer, tr.data.total_steps, 0, "none")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, times = [], []
        stream = iter_steps(tr, steps)
        for _ in range(steps):
            _sync(tr.device)
            t0 = time.perf_counter()
            stats, tokens = tr.train_step(next(stream))
            tokens = float(tokens)
            losses.append(summarize(stats, tr.cfg.ttt_step_loss_decay)["loss"])
            times.append((time.perf_counter() - t0, tokens))
        out = {"losses": losses, "tokens_per_s_after_2": sum(t for _, t in times[2:]) / sum(s for s, _ in times[2:]),
               "cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
               "param_dtypes": sorted({str(p.dtype) for p in tr.params})}
        if fsdp:
            out["forward_weight_dtypes"] = sorted({str(x) for x in seen})
            out["grad_dtypes"] = sorted(grad_dtypes)
        del tr
        if cuda:
            torch.cuda.empty_cache()
        return out

    plain = train(False)
    sharded = train(True)
    dist.destroy_process_group()
    rel = [abs(a - b) / abs(b) for a, b in zip(sharded["losses"], plain["losses"])]
    res = {"shape": shape_name, "seq": seq, "steps": steps, "plain": plain, "fsdp": sharded, "max_rel_loss_diff": max(rel)}
    res["passed"] = (max(rel) < 1e-2 and sharded["forward_weight_dtypes"] == ["torch.bfloat16"]
                     and sharded["grad_dtypes"] == ["torch.float32"] and sharded["param_dtypes"] == ["torch.float32"])
    log(f"fsdp: max rel loss diff {max(rel):.2e}; forward dtypes {sharded.get('forward_weight_dtypes')}; "
        f"grads {sharded.get('grad_dtypes')}; tok/s plain {plain['tokens_per_s_after_2']:.0f} fsdp "
        f"{sharded['tokens_per_s_after_2']:.0f}")
    return res


def render(r: dict) -> str:
    """Markdown lines for bench/results/summary.md."""
    lines = [f"device: {r.get('device_name')}"]
    a = r.get("attention", {})
    if "worst_fp32_rel" in a:
        lines.append(f"- attention (flex, compiled) vs dense reference, fwd + bwd, seq {a['seq']}, TTT steps "
                     f"{a['ttt_steps']}, {a['heads']}/{a['kv_heads']} heads x {a['head_dim']}: fp32 worst relative "
                     f"error {a['worst_fp32_rel']:.1e}; bf16 error {a['worst_bf16_err_ratio_flex_over_sdpa']:.2f}x "
                     f"the bf16 reference's own; fwd+bwd {a['fwd_bwd_ms_bf16']['flex']:.1f} ms flex vs "
                     f"{a['fwd_bwd_ms_bf16']['sdpa_reference']:.1f} ms reference -> "
                     f"{'passed' if a['passed'] else 'FAILED'}")
        sp = a.get("sparse")
        if sp:
            lines.append(f"- attention on kept query rows only (sparse TTT unroll, flex with query_pos, padded "
                         f"to T), {sp['kept_rows']} of {sp['seq']} rows: fp32 worst relative error "
                         f"{max(sp['fp32_vs_ref']):.1e} vs the SDPA compact form; bf16 fwd+bwd "
                         f"{sp['fwd_bwd_ms_bf16']['sparse']:.1f} ms vs {sp['fwd_bwd_ms_bf16']['dense_all_rows']:.1f} ms "
                         f"over every row")
    elif a:
        lines.append(f"- attention: FAILED ({a.get('error')})")
    f = r.get("fsdp", {})
    if "max_rel_loss_diff" in f:
        lines.append(f"- FSDP2 (one-rank NCCL group, bf16 MixedPrecisionPolicy) vs plain bf16, {f['shape']}@{f['seq']}, "
                     f"{f['steps']} steps: max relative loss difference {f['max_rel_loss_diff']:.1e}; weights in "
                     f"forward {f['fsdp']['forward_weight_dtypes']}, grads {f['fsdp']['grad_dtypes']}, stored "
                     f"{f['fsdp']['param_dtypes']}; {f['plain']['tokens_per_s_after_2']:,.0f} vs "
                     f"{f['fsdp']['tokens_per_s_after_2']:,.0f} tokens/s -> {'passed' if f['passed'] else 'FAILED'}")
    elif f:
        lines.append(f"- fsdp: FAILED ({f.get('error')})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", default="attention,fsdp")
    ap.add_argument("--name", default="gpu_checks")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny sizes on the CPU (gloo): checks the script itself before spending GPU time")
    a = ap.parse_args()
    if a.cpu_dry_run:
        runs = {"attention": lambda: check_attention(seq=128, steps=3, device="cpu"),
                "fsdp": lambda: check_fsdp(seq=64, steps=3, shape_name="tiny", device="cpu")}
        results: dict = {"device_name": "cpu (dry run)"}
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_checks needs CUDA (or --cpu-dry-run)")
    else:
        runs = {"attention": check_attention, "fsdp": check_fsdp}
        results = {"device_name": torch.cuda.get_device_name(0)}
    for name in a.checks.split(","):
        try:
            results[name] = runs[name]()
        except Exception as exc:  # keep the other check's result; the JSON says what broke
            import traceback

            traceback.print_exc()
            results[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        write_result(a.name, results)
    print({k: v.get("passed") for k, v in results.items() if isinstance(v, dict)})
    return 0 if all(v.get("passed") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
