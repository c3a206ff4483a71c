"""Side by side: our trainer vs the public `speculators` package, same draft, data, steps, machine.

1. makes bench/.venv-public with the PyPI package (bench/setup_public_venv.sh; pinned);
2. writes synthetic hidden states (format version 1) with every sample exactly one packed
   row long, and converts them to the public layout (bench/to_public_format.py);
3. runs both trainers in separate processes, alternating (ours, public, ours, public, ...)
   so machine-load drift hits both, from identical starting weights;
4. prints median tokens/s (first `--warmup` steps dropped), the ratio ours/public, peak
   RSS and both loss curves; writes bench/results/side_by_side_<shape>.json.

The ratio is taken per repeat (ours in repeat i over public in repeat i: the two ran next to
each other, under the same load) and reported as the median of those with their range, so
a reader sees how far one run can be trusted; two runs of this script agree within the
printed spread. Use enough steps (the median of a run ignores a slow step) and at least
three repeats.

Variants (`--variants`, comma list):
  ours          our trainer's defaults on this device (CPU: fp32, fused AdamW, lm_head trained)
  ours-frozen-head  ours (CPU: fp32) with the trainer's `--freeze-lm-head`: lm_head frozen as the
                public package freezes it (equal work per step; compare with public-fp32)
  ours-frozen   the same, its older name (results before the flag existed froze the head in the runner)
  ours-dense    ours with the TTT unroll at every position (before the counted-rows skip)
  ours-bf16-dense  the same under `--precision bf16`
  ours-eager    ours with `--loss-impl eager` (the lm_head + KL before fusion: the "before")
  ours-bf16-eager  the same under `--precision bf16`
  ours-bf16     ours with `--precision bf16` (bf16 autocast on the CPU too)
  ours-opt      `--precision bf16 --optimizer-impl fused` (the two measured wins, now trainer flags)
  ours-opt-frozen  ours-opt with lm_head frozen (the public package's work per step)
  public        public trainer, CPU bf16 autocast (the precision of its GPU path)
  public-fp32   public trainer in fp32 (hidden-states dtype float32, autocast off)

    python bench/side_by_side.py --shape tiny --steps 30 --repeats 2
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import fmt, log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402
from synthetic import write_v1_dataset  # noqa: E402

PUBLIC_VENV = Path(os.environ.get("PUBLIC_VENV", HERE / ".venv-public"))
PUBLIC_VERSION = os.environ.get("PUBLIC_SPECULATORS_VERSION", "0.9.0")

VARIANTS = {
    "ours": ("ours", []),
    "ours-frozen-head": ("ours", ["--freeze-lm-head"]),
    "ours-frozen": ("ours", ["--freeze-lm-head"]),
    "ours-dense": ("ours", ["--dense-ttt"]),
    "ours-bf16-dense": ("ours", ["--precision", "bf16", "--dense-ttt"]),
    "ours-eager": ("ours", ["--loss-impl", "eager"]),
    "ours-bf16-eager": ("ours", ["--precision", "bf16", "--loss-impl", "eager"]),
    "ours-bf16": ("ours", ["--precision", "bf16"]),
    "ours-sdpa": ("ours", ["--attn", "sdpa"]),
    "ours-opt": ("ours", ["--opt"]),
    "ours-opt-frozen": ("ours", ["--opt", "--freeze-lm-head"]),
    "public": ("public", ["--precision", "bf16"]),
    "public-fp32": ("public", ["--precision", "fp32"]),
}


def ensure_public_venv() -> None:
    env = dict(os.environ, PUBLIC_VENV=str(PUBLIC_VENV), PUBLIC_SPECULATORS_VERSION=PUBLIC_VERSION)
    env.setdefault("PYTHON", sys.executable)  # offline, the venv is made over this interpreter's torch
    subprocess.run(["bash", str(HERE / "setup_public_venv.sh")], check=True, env=env)


def run_variant(variant: str, data_ours: Path, data_public: Path, shape, steps: int, lr: float, out: Path,
                threads: int, timeout: int) -> dict:
    impl, extra = VARIANTS[variant]
    common = ["--shape", shape.name, "--seq-len", str(shape.seq_len), "--steps", str(steps), "--lr", str(lr),
              "--out", str(out)] + extra
    if threads:
        common += ["--threads", str(threads)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if impl == "ours":
        cmd = [sys.executable, str(HERE / "ours_runner.py"), "--data", str(data_ours)] + common
        cwd = str(HERE.parent)
    else:
        # -P, a neutral cwd and no PYTHONPATH: the public package must not be shadowed by ours.
        env.pop("PYTHONPATH", None)
        cmd = [str(PUBLIC_VENV / "bin" / "python"), "-P", str(HERE / "public_runner.py"), "--data", str(data_public)] + common
        cwd = "/"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def step_seconds(result: dict) -> list[float]:
    """Wall-clock seconds per optimizer step, measured the same way for both trainers."""
    out = []
    for s in result["steps"]:
        v = s.get("wall_s") if result["impl"] == "public" else s.get("step_s")
        out.append(float(v))
    return out


def spread(values: list[float]) -> float:
    """(max - min) / median: 0.05 means the runs lie within 5% of each other."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def paired_ratio(ours: list[float], theirs: list[float]) -> dict:
    """ours/theirs per repeat (runs i ran back to back), their median, range and spread."""
    per = [a / b for a, b in zip(ours, theirs)]
    return {"median": statistics.median(per), "per_repeat": per, "min": min(per), "max": max(per),
            "spread": spread(per)}


def summarize_runs(runs: list[dict], tokens_per_step: int, warmup: int) -> dict:
    per_run = []
    for r in runs:
        secs = step_seconds(r)[warmup:]
        per_run.append(tokens_per_step / statistics.median(secs))
    first = runs[0]
    cuda_peaks = [r["cuda_max_memory_allocated_mib"] for r in runs if r.get("cuda_max_memory_allocated_mib")]
    return {
        "tokens_per_s_median": statistics.median(per_run),
        "tokens_per_s_runs": per_run,
        "tokens_per_s_spread": spread(per_run),
        "cuda_peak_mib": max(cuda_peaks) if cuda_peaks else None,
        "train_peak_rss_mib": max(r.get("train_peak_rss_mib", 0) for r in runs),
        "peak_rss_mib": max(r.get("peak_rss_mib", 0) for r in runs),
        "trainable_params": first.get("trainable_params"),
        "loss_curve": [s["loss"] for s in first["steps"]],
        "loss_curves_all": [[s["loss"] for s in r["steps"]] for r in runs],
        "options": first.get("options"),
        "package": first.get("package", "speculators (this repo)"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the shape's CPU sequence length")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped from the throughput median")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the ratio is taken per repeat")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="ours,public,public-fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)

    shape = get_shape(a.shape)
    shape = shape.with_seq(a.seq_len or shape.cpu_seq_len)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    if any(VARIANTS[v][0] == "public" for v in variants) and not a.skip_setup:
        ensure_public_venv()

    root = Path(tempfile.mkdtemp(prefix="bench-sbs-", dir=a.tmp))
    try:
        # One packed row per sample: L = seq_len + 1 tokens shift to exactly seq_len.
        # Enough samples that neither trainer repeats one within the run (95% train split).
        n = int(a.steps / 0.95) + 3
        log(f"writing {n} samples of {shape.seq_len + 1} tokens, H={shape.hidden_size}")
        write_v1_dataset(root / "ours", n, shape.seq_len + 1, shape.hidden_size, shape.target_vocab, seed=0)
        from to_public_format import convert

        convert(root / "ours", root / "public")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        load_before = os.getloadavg()
        for rep in range(a.repeats):
            for v in variants:
                log(f"repeat {rep + 1}/{a.repeats}: {v}")
                res = run_variant(v, root / "ours", root / "public", shape, a.steps, a.lr,
                                  root / f"{v}-{rep}.json", a.threads, a.timeout)
                runs[v].append(res)
        tokens_per_step = shape.seq_len
        summary = {v: summarize_runs(rs, tokens_per_step, a.warmup) for v, rs in runs.items()}
        flops = shape.flops_per_step(tokens_per_step)
        for v, s in summary.items():
            s["model_tflops_per_s"] = flops["total"] * s["tokens_per_s_median"] / tokens_per_step / 1e12
        ratios, paired = {}, {}
        base = "public" if "public" in summary else next((v for v in summary if v.startswith("public")), None)
        if base:
            for v in summary:
                if v.startswith("ours"):
                    ratios[f"{v}/{base}"] = summary[v]["tokens_per_s_median"] / summary[base]["tokens_per_s_median"]
                    paired[f"{v}/{base}"] = paired_ratio(summary[v]["tokens_per_s_runs"],
                                                         summary[base]["tokens_per_s_runs"])
                    if "public-fp32" in summary and base != "public-fp32":
                        ratios[f"{v}/public-fp32"] = summary[v]["tokens_per_s_median"] / summary["public-fp32"]["tokens_per_s_median"]
        result = {
            "shape": shape.to_dict(),
            "seq_len": shape.seq_len,
            "steps": a.steps,
            "warmup_steps_dropped": a.warmup,
            "repeats": a.repeats,
            "lr": a.lr,
            "public_package": f"speculators=={PUBLIC_VERSION}",
            "variants": summary,
            "ratios": ratios,
            "paired_ratios": paired,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "flops_per_step": flops,
        }
        path = write_result(a.name or f"side_by_side_{shape.name}", result)
        print(render(result))
        log(f"wrote {path}")
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(result: dict) -> str:
    lines = [
        f"side by side: shape={result['shape']['name']} seq={result['seq_len']} steps={result['steps']} "
        f"repeats={result['repeats']} vs {result['public_package']}",
        "| variant | tokens/s (median) | runs | spread | train peak RSS MiB | peak CUDA MiB | trainable params "
        "| loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, s in result["variants"].items():
        curve = s["loss_curve"]
        cuda = s.get("cuda_peak_mib")
        lines.append(
            f"| {v} | {fmt(s['tokens_per_s_median'])} | {', '.join(fmt(x) for x in s['tokens_per_s_runs'])} | "
            f"{100 * s.get('tokens_per_s_spread', 0):.1f}% | {fmt(s['train_peak_rss_mib'])} | "
            f"{fmt(cuda) if cuda else '-'} | {s['trainable_params']:,} | {fmt(curve[0])} -> {fmt(curve[-1])} |"
        )
    paired = result.get("paired_ratios", {})
    for k, r in result["ratios"].items():
        p = paired.get(k)
        if p:
            lines.append(f"ratio {k}: {p['median']:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in p['per_repeat'])}; "
                         f"range {p['min']:.2f}-{p['max']:.2f}, spread {100 * p['spread']:.1f}%; "
                         f"ratio of medians {r:.2f}x)")
        else:
            lines.append(f"ratio {k}: {r:.2f}x")
    if "load_before" in result:
        lines.append(f"load average before/after: {', '.join(f'{x:.2f}' for x in result['load_before'])} / "
                     f"{', '.join(f'{x:.2f}' for x in result['load_after'])}")
    # loss curves, every few steps
    names = list(result["variants"])
    n = len(result["variants"][names[0]]["loss_curve"])
    every = max(1, n // 10)
    lines.append("loss curves (first repeat): step | " + " | ".join(names))
    for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
        vals = []
        for v in names:
            c = result["variants"][v]["loss_curve"]
            vals.append(fmt(c[i], 4) if i < len(c) else "-")
        lines.append(f"  {i + 1:4d} | " + " | ".join(vals))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
