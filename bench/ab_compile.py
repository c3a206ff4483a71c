"""In-process A/B of `torch.compile` on the draft training step: one trainer, eager vs compiled.

Regions (`--regions`, comma-separated): `layers` compiles each decoder layer's forward (its
attention closure, norms, RoPE, MLP and residuals; the matmuls stay ATen/oneDNN calls under
Inductor on the CPU), `loss` the fused KL's per-chunk function (log_softmax, exp, KL, its
gradient). (The optimizer is not a region: it is already the fused AdamW kernel, 2.5-3.6% of
the 8B step, and torch.compile traces only the foreach implementation.) The package is not
changed (no `--compile` flag: this A/B found no reliable gain, docs/benchmarks.md); the bench
swaps the compiled callables in and out between steps, so both variants run on the same
weights, the same process and, within a pair, the same batch (each variant takes one
optimizer step on it); the order within a pair alternates so load drift hits both alike. The
ratio is taken per pair, of the wall time and of this process's CPU time (steadier on a
shared machine); medians and ranges are reported. Compile time is the compiled variant's
first steps (recompiles for new row counts included) less an eager step, reported apart
from the steady state.

The data has varied document lengths (several documents packed per row) so the counted-rows
TTT unroll sees a different row count every batch, as on real data: the compiled code must
handle dynamic shapes (`--dynamic`; the graph and recompile counts are recorded).

    python bench/ab_compile.py --shape llama8b --seq-len 256 --pairs 5 --regions layers,loss
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402
from ours_runner import build_trainer, iter_steps  # noqa: E402
from synthetic import write_v1_dataset  # noqa: E402

REGIONS = ("layers", "loss")


class Switch:
    """The compiled regions, swapped in (`on`) and out (`off`): the layers as `nn.Module.compile`
    would set them (`_compiled_call_impl`), the loss by rebinding `lm_head_kl._chunk_kl`, which
    the fused loss looks up at every chunk."""

    def __init__(self, tr, regions: list[str], dynamic: bool | None):
        import speculators.train.lm_head_kl as lk

        self.tr, self.regions, self.lk = tr, regions, lk
        self.eager_chunk_kl = lk._chunk_kl
        self.layer_fns = [torch.compile(layer._call_impl, dynamic=dynamic) for layer in tr.draft.layers]
        self.chunk_kl = torch.compile(lk._chunk_kl, dynamic=True)  # its last chunk's rows vary

    def on(self) -> None:
        if "layers" in self.regions:
            for layer, fn in zip(self.tr.draft.layers, self.layer_fns):
                layer._compiled_call_impl = fn
        if "loss" in self.regions:
            self.lk._chunk_kl = self.chunk_kl

    def off(self) -> None:
        for layer in self.tr.draft.layers:
            layer._compiled_call_impl = None
        self.lk._chunk_kl = self.eager_chunk_kl


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "calls_captured": counters["stats"]["calls_captured"],
            "graph_breaks": sum(counters["graph_break"].values()), "graph_break_reasons": dict(counters["graph_break"])}


def timed_step(tr, batch) -> tuple[float, float]:
    """(wall s, this process's CPU s): on a shared machine the CPU time is the steadier one."""
    t0, c0 = time.perf_counter(), time.process_time()
    stats, _ = tr.train_step(batch)
    stats.cpu()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="hidden-state directory (default: varied-length synthetic data)")
    ap.add_argument("--samples", type=int, default=48, help="synthetic samples to write when --data is not given")
    ap.add_argument("--shape", default="llama8b")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="compiled steps before the pairs (compile + recompiles)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--regions", default="layers", help=f"comma-separated, of {', '.join(REGIONS)}")
    ap.add_argument("--dynamic", choices=["auto", "true", "false"], default="true",
                    help="the layers' torch.compile dynamic= (auto: None, recompile once a size changes; "
                         "the loss chunk is always dynamic)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    regions = [r for r in a.regions.split(",") if r]
    bad = [r for r in regions if r not in REGIONS]
    if bad or not regions:
        ap.error(f"--regions {a.regions!r}: choose from {', '.join(REGIONS)}")
    dynamic = {"auto": None, "true": True, "false": False}[a.dynamic]
    shape = get_shape(a.shape, a.seq_len)
    tmp = None
    data = a.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="ab_compile_")
        log(f"writing {a.samples} varied-length samples (<= {a.seq_len + 1} tokens, H={shape.hidden_size})")
        data = str(write_v1_dataset(tmp.name, a.samples, a.seq_len + 1, shape.hidden_size, shape.target_vocab,
                                    seed=0, vary_length=True))
    tr, _ = build_trainer(shape, data, a.seq_len, 1e-4, 0, "auto", a.precision, "auto", epochs=1)
    stream = iter_steps(tr, 1 + a.warmup + a.pairs)
    switch = Switch(tr, regions, dynamic)
    eager_first = timed_step(tr, next(stream))  # eager warm-up (allocator, oneDNN primitives)
    log(f"eager warm-up step {eager_first[0]:.2f} s (cpu {eager_first[1]:.2f} s)")
    switch.on()
    warm = []
    for i in range(a.warmup):
        warm.append(timed_step(tr, next(stream)))
        log(f"compiled warm-up step {i + 1}: {warm[-1][0]:.2f} s (cpu {warm[-1][1]:.2f} s), "
            f"{dynamo_counts()['unique_graphs']} graphs")
    counts_after_warmup = dynamo_counts()
    times = {"eager": [], "compiled": []}
    cpu = {"eager": [], "compiled": []}
    rows = []
    for i in range(a.pairs):
        batch = next(stream)
        rows.append(int(batch["ttt_rows"].numel()) if "ttt_rows" in batch else None)
        order = ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")
        for v in order:
            (switch.on if v == "compiled" else switch.off)()
            wall, used = timed_step(tr, batch)
            times[v].append(wall)
            cpu[v].append(used)
            log(f"pair {i + 1}: {v} {wall:.2f} s (cpu {used:.2f} s) load {os.getloadavg()[0]:.1f}")
    counts = dynamo_counts()
    per = [e / c for e, c in zip(times["eager"], times["compiled"])]
    per_cpu = [e / c for e, c in zip(cpu["eager"], cpu["compiled"])]
    eager_med = statistics.median(times["eager"])
    result = {
        "shape": shape.to_dict(), "seq_len": a.seq_len, "precision": a.precision, "pairs": a.pairs,
        "regions": regions, "dynamic": a.dynamic, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "eager_first_step_s": eager_first, "compiled_warmup_steps_s": warm,
        "compile_s_estimate": sum(w for w, _ in warm) - len(warm) * eager_med,
        "step_s": times, "step_cpu_s": cpu, "ttt_rows_per_pair": rows,
        "speedup_per_pair": per, "speedup_median": statistics.median(per), "speedup_range": [min(per), max(per)],
        "cpu_speedup_per_pair": per_cpu, "cpu_speedup_median": statistics.median(per_cpu),
        "cpu_speedup_range": [min(per_cpu), max(per_cpu)],
        "dynamo_after_warmup": counts_after_warmup, "dynamo_end": counts,
        "recompiled_during_pairs": counts["unique_graphs"] - counts_after_warmup["unique_graphs"],
        "load": os.getloadavg(),
    }
    name = a.name or f"ab_compile_{shape.name}_{a.precision}_{'-'.join(regions)}"
    path = write_result(name, result)
    print(f"compiled ({'+'.join(regions)}, dynamic={a.dynamic}) vs eager, {a.precision}: "
          f"{result['speedup_median']:.3f}x (per pair {', '.join(f'{x:.3f}' for x in per)}), "
          f"CPU time {result['cpu_speedup_median']:.3f}x (per pair {', '.join(f'{x:.3f}' for x in per_cpu)}); "
          f"step s eager {eager_med:.2f}, compiled {statistics.median(times['compiled']):.2f}; "
          f"compile ~{result['compile_s_estimate']:.0f} s; graphs {counts['unique_graphs']}, "
          f"breaks {counts['graph_breaks']}, new graphs in pairs {result['recompiled_during_pairs']}; "
          f"load {os.getloadavg()}")
    log(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
