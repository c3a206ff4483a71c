"""Where a training step's time goes: per-region wall time plus a torch.profiler op table.

Regions are marked without touching the trainer's source: forward/backward hooks on the
draft's modules (`fc`, each layer's `self_attn` and `mlp`, `lm_head`, the verifier head),
wrappers around the loss functions (`kl_fused` / `kl_eager`; with `--loss-impl chunked`
the whole lm_head + KL counts as "kl"; with `fused` the KL's backward is made in its
forward), the TTT mask builders
`context_mask` / `step_valid_positions` / `step_token_counts`) and around the trainer's
batch stream (data loading + collate; the device copy is inside `train_step`), `loss.backward()`, gradient clipping and
`optimizer.step`. Each region also opens a `torch.profiler.record_function` range named
`bench::<region>`, so the profiler trace shows them.

Timings are wall clock (`time.perf_counter`, after a CUDA sync on GPU), summed over the
profiled steps; "other forward" / "other backward" are what the regions do not cover
(norms, RoPE, residuals, embedding, loss glue, autograd bookkeeping).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict

import torch


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._open: dict[str, list] = defaultdict(list)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self, name: str) -> None:
        self._sync()
        rf = torch.profiler.record_function(f"bench::{name}")
        rf.__enter__()
        self._open[name].append((time.perf_counter(), rf))

    def stop(self, name: str) -> None:
        if not self._open[name]:
            return
        self._sync()
        t0, rf = self._open[name].pop()
        rf.__exit__(None, None, None)
        self.totals[name] += time.perf_counter() - t0
        self.counts[name] += 1

    @contextlib.contextmanager
    def region(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


class _Mark(torch.autograd.Function):
    """Identity whose backward opens (`edge="out"`) or closes (`edge="in"`) a region."""

    @staticmethod
    def forward(ctx, x, clock, name, edge):
        ctx.clock, ctx.name, ctx.edge = clock, name, edge
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.edge == "out":
            ctx.clock.start(ctx.name)
        else:
            ctx.clock.stop(ctx.name)
        return grad, None, None, None


def _wrap_fn(clock: _Clock, fn, name: str, differentiable: bool = False):
    def wrapped(*args, **kwargs):
        if differentiable and torch.is_grad_enabled():
            args = tuple(
                _Mark.apply(a, clock, f"bwd {name}", "in") if isinstance(a, torch.Tensor) and a.requires_grad else a
                for a in args
            )
        with clock.region(f"fwd {name}"):
            out = fn(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out  # the differentiable output comes first
        if differentiable and isinstance(first, torch.Tensor) and first.requires_grad:
            first = _Mark.apply(first, clock, f"bwd {name}", "out")
            out = (first, *out[1:]) if isinstance(out, tuple) else first
        return out

    return wrapped


@contextlib.contextmanager
def instrument(tr, device: torch.device):
    """Install the region markers on trainer `tr`; yields the clock."""
    import speculators.models.eagle3.model as model_mod
    import speculators.train.lm_head_kl as kl_mod
    import speculators.train.objective as obj_mod
    import speculators.train.trainer as trainer_mod

    clock = _Clock(device)
    # fc's input (verifier hidden states) needs no grad; its backward hook still fires, as wanted.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    handles = []
    patches: list[tuple[object, str, object]] = []

    def patch(obj, attr, new):
        if hasattr(obj, attr):
            patches.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, new)

    draft = tr.draft
    modules = [("fc", draft.fc), ("lm_head", draft.lm_head)]
    for i, layer in enumerate(draft.layers):
        modules.append(("attention", layer.self_attn))
        modules.append(("mlp", layer.mlp))
    head = getattr(tr.objective, "verifier_head", None)
    if head is not None:
        modules.append(("verifier head (targets)", head))
    for name, mod in modules:
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: clock.start(f"fwd {n}")))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: clock.stop(f"fwd {n}")))
        if name != "verifier head (targets)":
            handles.append(mod.register_full_backward_pre_hook(lambda m, g, n=name: clock.start(f"bwd {n}")))
            handles.append(mod.register_full_backward_hook(lambda m, gi, go, n=name: clock.stop(f"bwd {n}")))

    # the `chunked` loss does lm_head and KL in one function: all of it counts as "kl" then
    for fn_name in ("kl_fused", "kl_eager", "lm_head_kl_chunked"):
        patch(kl_mod, fn_name, _wrap_fn(clock, getattr(kl_mod, fn_name), "kl", differentiable=True))
    for mod, fn_name in ((model_mod, "context_mask"), (obj_mod, "step_valid_positions"),
                         (trainer_mod, "step_token_counts"), (obj_mod, "step_token_counts")):
        if hasattr(mod, fn_name):
            patch(mod, fn_name, _wrap_fn(clock, getattr(mod, fn_name), "mask build"))

    orig_backward = torch.autograd.backward

    def backward(*args, **kwargs):
        with clock.region("backward total"):
            return orig_backward(*args, **kwargs)

    patch(torch.autograd, "backward", backward)
    orig_clip = torch.nn.utils.clip_grad_norm_
    patch(torch.nn.utils, "clip_grad_norm_", _wrap_fn(clock, orig_clip, "grad clip"))
    patch(tr.optimizer, "step", _wrap_fn(clock, tr.optimizer.step, "optimizer"))
    try:
        yield clock
    finally:
        for h in handles:
            h.remove()
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)


# Ops that make the host wait for the device on CUDA (a tensor read as a Python number, a
# data-dependent shape); counted on any device, so a CPU run shows the syncs a CUDA step has.
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")


def host_sync_ops(tr, batch) -> dict[str, list[str]]:
    """Each host-syncing op one `train_step(batch)` dispatches, with the code line that asked
    for it (the batch is already loaded: the loader's host work is not the step's)."""
    import traceback
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[str, list[str]] = defaultdict(list)

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in SYNC_OPS:
                ours = [f for f in traceback.extract_stack() if "/speculators/" in f.filename]
                seen[name].append(f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "torch")
            return func(*args, **(kwargs or {}))

    with _Watch():
        tr.train_step(batch)
    return dict(seen)


def profile_steps(tr, stream, n_steps: int, device: torch.device, top: int = 15, trace_path: str | None = None) -> dict:
    """Run `n_steps` batches from `stream` instrumented (first half timed, second half under
    torch.profiler), then one more watched for host syncs, and return the breakdown, the
    profiler's top ops and the syncing ops (`host_sync_ops`); `trace_path` keeps the
    profiler's Chrome trace (gzip)."""
    from torch.profiler import ProfilerActivity, profile

    half = max(1, n_steps // 2)
    with instrument(tr, device) as clock:
        t0 = time.perf_counter()
        for _ in range(half):
            with clock.region("fwd data (load+collate+copy)"):
                batch = next(stream)
            tr.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        totals = dict(clock.totals)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        ops = []
        rest = n_steps - half
        if rest > 0:
            with profile(activities=activities, record_shapes=False) as prof:
                for _ in range(rest):
                    tr.train_step(next(stream))
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            if trace_path:
                _export_trace(prof, trace_path)
            for ev in sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True):
                if ev.key.startswith("bench::"):
                    continue
                ops.append({"op": ev.key, "self_ms": getattr(ev, key, 0) / 1000 / rest, "calls": ev.count})
                if len(ops) >= top:
                    break
    steps = half
    per_step = {k: v / steps for k, v in totals.items()}
    fwd_regions = {k[4:]: v for k, v in per_step.items() if k.startswith("fwd ")}
    bwd_regions = {k[4:]: v for k, v in per_step.items() if k.startswith("bwd ")}
    step_s = wall / steps
    backward_total = per_step.get("backward total", 0.0)
    data = fwd_regions.pop("data (load+collate+copy)", 0.0)
    clip = fwd_regions.pop("grad clip", 0.0)
    opt = fwd_regions.pop("optimizer", 0.0)
    rows = []
    for name in ("mask build", "fc", "attention", "mlp", "lm_head", "kl", "verifier head (targets)"):
        f, b = fwd_regions.pop(name, 0.0), bwd_regions.pop(name, 0.0)
        rows.append({"region": name, "forward_s": f, "backward_s": b, "total_s": f + b})
    for name in sorted(set(fwd_regions) | set(bwd_regions)):
        f, b = fwd_regions.get(name, 0.0), bwd_regions.get(name, 0.0)
        rows.append({"region": name, "forward_s": f, "backward_s": b, "total_s": f + b})
    covered_bwd = sum(r["backward_s"] for r in rows)
    covered_fwd = sum(r["forward_s"] for r in rows)
    forward_total = step_s - backward_total - data - clip - opt
    rows.append({"region": "other forward (norms, rope, embed, loss glue)", "forward_s": max(0.0, forward_total - covered_fwd),
                 "backward_s": 0.0, "total_s": max(0.0, forward_total - covered_fwd)})
    rows.append({"region": "other backward (autograd, norms, rope)", "forward_s": 0.0,
                 "backward_s": max(0.0, backward_total - covered_bwd), "total_s": max(0.0, backward_total - covered_bwd)})
    rows.append({"region": "data (load+collate+copy)", "forward_s": data, "backward_s": 0.0, "total_s": data})
    rows.append({"region": "grad clip + optimizer", "forward_s": clip + opt, "backward_s": 0.0, "total_s": clip + opt})
    for r in rows:
        r["share"] = r["total_s"] / step_s if step_s else 0.0
    out = {"steps_timed": steps, "steps_profiled": n_steps - half, "step_s": step_s, "regions": rows, "top_ops": ops}
    if rest > 0:
        out["trace"] = trace_path
    out["host_sync_ops"] = host_sync_ops(tr, next(stream))
    return out


def _export_trace(prof, path: str) -> None:
    """The Chrome trace (chrome://tracing, Perfetto) gzip-compressed at `path`."""
    import gzip
    import os
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        raw = f.name
    try:
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
    finally:
        os.unlink(raw)


def render(profile: dict) -> str:
    lines = [f"step {profile['step_s'] * 1000:.1f} ms (mean of {profile['steps_timed']} instrumented steps)",
             "| region | forward ms | backward ms | share |", "| --- | --- | --- | --- |"]
    for r in profile["regions"]:
        lines.append(f"| {r['region']} | {r['forward_s'] * 1000:.1f} | {r['backward_s'] * 1000:.1f} | {r['share'] * 100:.1f}% |")
    if profile.get("host_sync_ops") is not None:
        syncs = profile["host_sync_ops"]
        lines.append("host-sync ops in one train_step: " + ("; ".join(
            f"{k} x{len(v)} ({', '.join(sorted(set(v)))})" for k, v in sorted(syncs.items())) or "none"))
    if profile.get("top_ops"):
        lines.append(f"top ops by self time (torch.profiler, per step over {profile['steps_profiled']} steps):")
        for o in profile["top_ops"][:10]:
            lines.append(f"  {o['self_ms']:9.2f} ms  {o['calls']:6d}x  {o['op']}")
    return "\n".join(lines)
