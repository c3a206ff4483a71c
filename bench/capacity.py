"""Capacity plan: verifier and trainer GPUs, storage and GPU-hours from measured figures.

Pure arithmetic over figures read from `bench/results/*.json` (measured) or derived from a
stated assumption (estimated); nothing here runs a model. `python bench/capacity.py` prints
the tables docs/scaling.md ("Capacity plan") shows; every figure carries its source.

Conventions: a *sample* is one training sequence of `tokens_per_sample` tokens; a
*sample-epoch* is one sample trained once. Offline (and hybrid `--on-generate cache`) runs the
verifier once per sample and stores its hidden states; online (`--on-generate delete`) runs
the verifier again every epoch and stores nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

H100_H200_BF16_DENSE_TFLOPS = 989.0  # datasheet dense bf16 peak, the same for H100 SXM and H200
TB = 1e12


@dataclass(frozen=True)
class Figure:
    """A throughput (tokens/s per device) with where it came from."""

    value: float
    source: str  # "measured: ..." or "estimated: ..."


@dataclass(frozen=True)
class Verifier:
    name: str
    params: float  # parameters counted in the forward matmuls (embedding lookup excluded is fine: it is small)
    hidden_size: int
    num_layers: int
    stored_layers: int = 4  # 3 auxiliary layers + the last one (EAGLE-3), as datagen stores them


LLAMA_8B = Verifier("Llama-3.1-8B", params=8.03e9, hidden_size=4096, num_layers=32)


# --------------------------------------------------------------------------- pure formulas

def hs_bytes_per_token(hidden_size: int, stored_layers: int, storage: str) -> int:
    """Hidden-state payload bytes per token: bf16 = 2H per layer; fp8 = H + one float32 scale per
    token and layer (speculators.data.hs_quant.bytes_per_token, the layout datagen writes)."""
    if storage == "bf16":
        per_layer = 2 * hidden_size
    elif storage == "fp8":
        per_layer = hidden_size + 4
    else:
        raise ValueError(f"storage must be bf16 or fp8, not {storage!r}")
    return per_layer * stored_layers


def storage_bytes(samples: int, tokens_per_sample: float, bytes_per_token: float) -> float:
    return samples * tokens_per_sample * bytes_per_token


def prefill_flops_per_token(v: Verifier, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x params (matmuls) + causal attention (QK^T and AV over on
    average seq/2 keys: 2 x 2 x seq/2 x H per layer)."""
    return 2.0 * v.params + 2.0 * v.num_layers * seq_len * v.hidden_size


def estimated_prefill_tokens_per_s(v: Verifier, seq_len: int, peak_tflops: float, mfu: float) -> float:
    return mfu * peak_tflops * 1e12 / prefill_flops_per_token(v, seq_len)


def devices_for_rate(samples_per_hour: float, tokens_per_sample: float, tokens_per_s: float) -> int:
    """Devices needed to push `samples_per_hour` samples of `tokens_per_sample` tokens through a
    stage that does `tokens_per_s` tokens/s per device (rounded up; 0 for no work)."""
    need = samples_per_hour * tokens_per_sample / 3600.0 / tokens_per_s
    return math.ceil(need - 1e-9) if need > 0 else 0


def device_hours(samples: int, tokens_per_sample: float, passes: float, tokens_per_s: float) -> float:
    return samples * tokens_per_sample * passes / tokens_per_s / 3600.0


@dataclass(frozen=True)
class RunCost:
    mode: str
    verifier_gpu_h: float
    trainer_gpu_h: float
    stored_bytes: float

    @property
    def gpu_h(self) -> float:
        return self.verifier_gpu_h + self.trainer_gpu_h


def run_cost(mode: str, samples: int, tokens_per_sample: float, epochs: int, verifier_tps: float,
             trainer_tps: float, bytes_per_token: float) -> RunCost:
    """offline / hybrid: the verifier once, the hidden states stored; online: the verifier every
    epoch, nothing stored. The trainer trains every sample `epochs` times either way."""
    if mode not in ("offline", "online"):
        raise ValueError(f"mode must be offline or online, not {mode!r}")
    passes = 1 if mode == "offline" else epochs
    return RunCost(
        mode=mode,
        verifier_gpu_h=device_hours(samples, tokens_per_sample, passes, verifier_tps),
        trainer_gpu_h=device_hours(samples, tokens_per_sample, epochs, trainer_tps),
        stored_bytes=storage_bytes(samples, tokens_per_sample, bytes_per_token) if mode == "offline" else 0.0,
    )


def break_even_gpu_h_per_tb(samples: int, tokens_per_sample: float, epochs: int, verifier_tps: float,
                            bytes_per_token: float) -> float:
    """Verifier GPU-hours offline saves per TB it stores: (epochs - 1) x the verifier pass, over the
    stored TB. Offline is cheaper when keeping one TB for the run costs less than this many
    GPU-hours (0 at one epoch: then online never loses)."""
    saved = device_hours(samples, tokens_per_sample, epochs - 1, verifier_tps)
    return saved / (storage_bytes(samples, tokens_per_sample, bytes_per_token) / TB)


def read_bandwidth_bytes_per_s(trainer_tps: float, bytes_per_token: float) -> float:
    """Disk read rate one trainer needs offline (hidden states in, nothing cached)."""
    return trainer_tps * bytes_per_token


# --------------------------------------------------------------------------- measured figures

def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _when(d: dict) -> str:
    m = d["machine"]
    where = m.get("gpu") or f"{m['nproc']}-core CPU ({m['cpu']})"
    return f"{where}, {m['timestamp'][:16].replace('T', ' ')} UTC, load {m['load_avg'][0]:.0f}"


@dataclass(frozen=True)
class Figures:
    train_8b_2048: Figure
    train_8b_8192: Figure
    datagen_demo_cpu: Figure
    datagen_demo_cpu_vllm: Figure
    train_demo_cpu: Figure
    online_generate_cpu: Figure
    online_cache_read_cpu: Figure
    disk_bpt_h4096: Figure
    demo_bpt_bf16: Figure
    demo_bpt_fp8: Figure
    demo_tokens_per_sample: float


def measured_figures() -> Figures:
    t2, t8 = _load("train_gpu_2048"), _load("train_gpu_8192")
    dg, on, dl = _load("datagen_backends"), _load("online"), _load("dataload_h4096_l2048")
    runs = {r["backend"]: r for r in dg["models"]["demo"]["runs"]}
    tr, vl = runs["transformers"], runs["vllm"]
    modes = on["modes"]
    return Figures(
        train_8b_2048=Figure(t2["runs"]["llama8b@2048"]["tokens_per_s"],
                             f"measured: bench_train.py 8B-shaped draft @2048, bf16, {_when(t2)}"),
        train_8b_8192=Figure(t8["runs"]["llama8b@8192"]["tokens_per_s"],
                             f"measured: bench_train.py 8B-shaped draft @8192, bf16, {_when(t8)}"),
        datagen_demo_cpu=Figure(tr["storage"]["bf16"]["end2end_tokens_per_s"],
                                f"measured: bench_datagen.py demo verifier, transformers, end to end, {_when(dg)}"),
        datagen_demo_cpu_vllm=Figure(vl["storage"]["bf16"]["end2end_tokens_per_s"],
                                     f"measured: bench_datagen.py demo verifier, vLLM CPU, end to end, {_when(dg)}"),
        train_demo_cpu=Figure(on["trainer"]["tokens_per_s_median"],
                              f"measured: speculators train (demo draft) median step, {_when(on)}"),
        online_generate_cpu=Figure(modes["generate"]["tokens_per_s"],
                                   f"measured: bench_online.py, one vLLM CPU server, {_when(on)}"),
        online_cache_read_cpu=Figure(modes["cache bf16: later epochs (disk)"]["tokens_per_s"],
                                     f"measured: bench_online.py, hybrid cache read back, {_when(on)}"),
        disk_bpt_h4096=Figure(dl["layouts"]["safetensors"]["bytes_per_token"],
                              f"measured: bench_dataload.py H 4096 x 4 layers bf16 shards, {_when(dl)}"),
        demo_bpt_bf16=Figure(modes["cache bf16: later epochs (disk)"]["disk_bytes_per_token"],
                             f"measured: online.json bf16 cache files, {_when(on)}"),
        demo_bpt_fp8=Figure(modes["cache fp8: later epochs (disk)"]["disk_bytes_per_token"],
                            f"measured: online.json fp8 cache files, {_when(on)}"),
        demo_tokens_per_sample=on["mean_tokens_per_sample"],
    )


# --------------------------------------------------------------------------- report

def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"


def report(samples: int = 500_000, seq_len: int = 2048, epochs: int = 4, mfus=(0.4, 0.2)) -> str:
    f = measured_figures()
    out: list[str] = []
    v = LLAMA_8B
    est = {m: Figure(estimated_prefill_tokens_per_s(v, seq_len, H100_H200_BF16_DENSE_TFLOPS, m),
                     f"estimated: {prefill_flops_per_token(v, seq_len) / 1e9:.1f} GFLOP/token "
                     f"(2 x {v.params / 1e9:.2f}B params + causal attention @{seq_len}) at an assumed "
                     f"{m:.0%} MFU of {H100_H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s (H100/H200 bf16 dense)")
           for m in mfus}
    verifier = est[mfus[0]]
    trainer = f.train_8b_2048 if seq_len <= 2048 else f.train_8b_8192
    bpt = {s: hs_bytes_per_token(v.hidden_size, v.stored_layers, s) for s in ("bf16", "fp8")}

    out.append(f"## Figures ({v.name} verifier, H {v.hidden_size}, {v.num_layers} layers, "
               f"{v.stored_layers} stored layers, {seq_len} tokens/sample)\n")
    out.append("| figure | value | source |\n| --- | --- | --- |")
    for m in mfus:
        out.append(f"| verifier prefill tokens/s per GPU, MFU {m:.0%} | {_n(est[m].value)} | {est[m].source} |")
    out.append(f"| trainer tokens/s per GPU, draft @2048 | {_n(f.train_8b_2048.value)} | {f.train_8b_2048.source} |")
    out.append(f"| trainer tokens/s per GPU, draft @8192 | {_n(f.train_8b_8192.value)} | {f.train_8b_8192.source} |")
    for s in ("bf16", "fp8"):
        out.append(f"| hidden-state bytes/token, {s} | {bpt[s]:,} | computed: hs_quant.bytes_per_token layout |")
    out.append(f"| bytes/token on disk, bf16 shards (check) | {_n(f.disk_bpt_h4096.value)} | {f.disk_bpt_h4096.source} |")

    out.append(f"\n## GPUs to train N samples/hour ({seq_len} tokens/sample; N counts sample-epochs, "
               f"i.e. what the trainer consumes; verifier at MFU {mfus[0]:.0%} / {mfus[1]:.0%}; trainer as measured)\n")
    out.append(f"| N samples/hour | trainer GPUs | verifier GPUs, online (every sample-epoch) | "
               f"verifier GPUs, offline with {epochs} epochs (N/{epochs} new samples/hour) |")
    out.append("| --- | --- | --- | --- |")
    for n in (1_000, 10_000, 50_000, 100_000, 500_000):
        online = " / ".join(str(devices_for_rate(n, seq_len, est[m].value)) for m in mfus)
        offline = " / ".join(str(devices_for_rate(n / epochs, seq_len, est[m].value)) for m in mfus)
        out.append(f"| {n:,} | {devices_for_rate(n, seq_len, trainer.value)} | {online} | {offline} |")
    ratio = trainer.value / verifier.value
    out.append(f"\nOnline, one trainer GPU consumes {_n(trainer.value)} tokens/s, which takes "
               f"{ratio:.2f} verifier GPUs at MFU {mfus[0]:.0%} ({trainer.value / est[mfus[1]].value:.2f} at "
               f"{mfus[1]:.0%}). Offline, one trainer GPU reads "
               f"{read_bandwidth_bytes_per_s(trainer.value, bpt['bf16']) / 1e9:.2f} GB/s of bf16 hidden states "
               f"({read_bandwidth_bytes_per_s(trainer.value, bpt['fp8']) / 1e9:.2f} GB/s fp8); one verifier GPU "
               f"writes {read_bandwidth_bytes_per_s(verifier.value, bpt['bf16']) / 1e9:.2f} GB/s (bf16).")

    out.append(f"\n## A run of {samples:,} samples x {seq_len} tokens, {epochs} epochs "
               f"(verifier at MFU {mfus[0]:.0%}, trainer as measured)\n")
    out.append("| mode | verifier GPU-h | trainer GPU-h | GPU-h total | stored TB |\n| --- | --- | --- | --- | --- |")
    rows = [("offline / hybrid, bf16", run_cost("offline", samples, seq_len, epochs, verifier.value, trainer.value, bpt["bf16"])),
            ("offline / hybrid, fp8", run_cost("offline", samples, seq_len, epochs, verifier.value, trainer.value, bpt["fp8"])),
            ("online", run_cost("online", samples, seq_len, epochs, verifier.value, trainer.value, bpt["bf16"]))]
    for name, c in rows:
        out.append(f"| {name} | {_n(c.verifier_gpu_h)} | {_n(c.trainer_gpu_h)} | {_n(c.gpu_h)} | {c.stored_bytes / TB:.1f} |")
    lo = run_cost("online", samples, seq_len, epochs, est[mfus[1]].value, trainer.value, bpt["bf16"])
    out.append(f"\nAt MFU {mfus[1]:.0%} the verifier GPU-hours double: offline "
               f"{_n(device_hours(samples, seq_len, 1, est[mfus[1]].value))}, online {_n(lo.verifier_gpu_h)}.")

    out.append("\n## When offline beats online\n")
    out.append("| epochs | verifier GPU-h saved by offline | bf16: GPU-h saved per TB stored | fp8: GPU-h saved per TB stored |")
    out.append("| --- | --- | --- | --- |")
    for e in (1, 2, 4, 10):
        saved = device_hours(samples, seq_len, e - 1, verifier.value)
        out.append(f"| {e} | {_n(saved)} | "
                   f"{break_even_gpu_h_per_tb(samples, seq_len, e, verifier.value, bpt['bf16']):.2f} | "
                   f"{break_even_gpu_h_per_tb(samples, seq_len, e, verifier.value, bpt['fp8']):.2f} |")

    tps = f.demo_tokens_per_sample
    out.append(f"\n## Measured on this CPU machine: the demo verifier (H 128, 4 stored layers), "
               f"{samples:,} samples x {tps:.1f} tokens (the demo's mean), {epochs} epochs\n")
    out.append("| figure | tokens/s | source |\n| --- | --- | --- |")
    for name, fig in (("datagen, transformers", f.datagen_demo_cpu), ("datagen, vLLM CPU", f.datagen_demo_cpu_vllm),
                      ("online store, vLLM CPU server", f.online_generate_cpu),
                      ("hybrid cache read back (bf16)", f.online_cache_read_cpu), ("trainer (demo draft)", f.train_demo_cpu)):
        out.append(f"| {name} | {_n(fig.value)} | {fig.source} |")
    off = run_cost("offline", samples, tps, epochs, f.datagen_demo_cpu.value, f.train_demo_cpu.value, f.demo_bpt_bf16.value)
    on = run_cost("online", samples, tps, epochs, f.online_generate_cpu.value, f.train_demo_cpu.value, 0.0)
    out.append("\n| mode | datagen machine-h | trainer machine-h | stored GB (bf16 / fp8 files) |\n| --- | --- | --- | --- |")
    fp8_gb = storage_bytes(samples, tps, f.demo_bpt_fp8.value) / 1e9
    out.append(f"| offline | {_n(off.verifier_gpu_h)} | {_n(off.trainer_gpu_h)} | {off.stored_bytes / 1e9:.1f} / {fp8_gb:.1f} |")
    out.append(f"| online | {_n(on.verifier_gpu_h)} | {_n(on.trainer_gpu_h)} | 0 |")
    out.append(f"\nHere the online store ({_n(f.online_generate_cpu.value)} tokens/s) keeps ahead of the trainer "
               f"({_n(f.train_demo_cpu.value)} tokens/s), so one 2-core machine does either; the figures were "
               "taken under load 14-25 on a shared machine and move by 2x with load.")
    return "\n".join(out)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
