"""Data loading throughput of the offline hidden-state layouts.

Compares, on the same synthetic samples:

* `pt`          - one `data_<i>.pt` per sample (format version 1, what datagen writes),
                  read by `speculators.data.formats.PtSampleStore`;
* `safetensors` - the sharded layout from `convert_pt_to_safetensors`, read by
                  `SafetensorsSampleStore` (memory-mapped slices);
* `public`      - the public package's layout (`hs_<i>.safetensors`, one per sample) read
                  the way its `FileTransfer` does (`safetensors.torch.load_file`), for scale.

For each: samples/s and MB/s (hidden-state bytes delivered by `store.load`, which
dequantises fp8 on the host), with the page cache warm (data read once before) and cold
(our files evicted with posix_fadvise DONTNEED, which touches only these files), plus
`Eagle3Dataset` + collator throughput (shift + concat: what a DataLoader worker does), the
same followed by the trainer's `to_device` on the CPU in bf16 (what a training step really
waits for: fp8 is dequantised there), the bytes per token of the collated batch (what
crosses to the accelerator) and disk bytes per token. For fp8 the same two figures are also
taken with the samples dequantised per sample in the loader (``host_dequant_*``, how fp8 was
read before it went to the device as stored), alternating with the new path in one process.

``--hidden-states-dtypes bf16,fp8`` measures each storage (`--hidden-states-dtype` of datagen;
fp8 is the bf16 data re-encoded with `speculators.data.hs_quant`, the public layout only for bf16).

    python bench/bench_dataload.py --hidden 1024 --seq-len 2048 --samples 32
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


from common import fmt, log, write_result  # noqa: E402
from synthetic import dir_bytes, write_v1_dataset  # noqa: E402


def evict(directory: Path) -> None:
    """Drop these files' pages from the page cache (only ours; other users' stay)."""
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # freshly written pages are dirty and cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _touch(sample: dict) -> int:
    """Force the data to be read (mmap'd tensors are lazy) and return hidden bytes."""
    total = 0
    for h in sample["hidden_states"] if isinstance(sample["hidden_states"], (list, tuple)) else [sample["hidden_states"]]:
        total += h.numel() * h.element_size()
        h.sum()  # full pass: a real consumer reads every byte
    return total


def time_reads(load, n: int, order: list[int]) -> dict:
    start = time.perf_counter()
    nbytes = 0
    for i in order:
        nbytes += _touch(load(i))
    dt = time.perf_counter() - start
    return {"samples": len(order), "seconds": dt, "samples_per_s": len(order) / dt, "mb_per_s": nbytes / dt / 1e6, "bytes": nbytes}


def public_loader(directory: Path):
    from safetensors.torch import load_file

    def load(i: int) -> dict:
        d = load_file(str(directory / "hidden_states" / f"hs_{i}.safetensors"))
        return {"hidden_states": d["hidden_states"], "input_ids": d["token_ids"]}

    return load


def reencode(src: Path, dst: Path, storage: str) -> Path:
    """`src` (a bf16 pt store) written again with `storage` hidden states, as datagen would."""
    from speculators.data import data_config as dc
    from speculators.data.formats import open_sample_store, write_pt_sample
    from speculators.data.hs_quant import RECORDED_NAME

    store = open_sample_store(src)
    dst.mkdir(parents=True)
    for i in range(len(store)):
        write_pt_sample(dst, store.sample_indices[i], store.load(i), storage=storage)
    config = dict(store.config)
    config["hidden_states_dtype"] = RECORDED_NAME[storage]
    dc.write(dst / "data_config.json", config)
    return dst


class HostDequantised:
    """A store whose training reads are dequantised per sample on the host (`load`), the way the
    loader did before fp8 went to the device as stored: the baseline, in the same process."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def load_stored(self, i: int) -> dict:
        return self.store.load(i)


def batch_bytes(batch: dict) -> int:
    """Bytes of a collated batch's hidden-state tensors (values and scales) before `to_device`."""
    return sum(v.numel() * v.element_size() for k, v in batch.items() if "hidden_states" in k)


def run(a) -> dict:
    from speculators.data.dataset import Eagle3Collator, Eagle3Dataset
    from speculators.data.formats import convert_pt_to_safetensors, open_sample_store
    from speculators.train.step_data import to_device

    root = Path(tempfile.mkdtemp(prefix="bench-dataload-", dir=a.tmp))
    try:
        src = root / "pt"
        log(f"writing {a.samples} synthetic samples H={a.hidden} K={a.layers} L={a.seq_len} bf16 to {src}")
        write_v1_dataset(src, a.samples, a.seq_len, a.hidden, vocab_size=32000, num_layers=a.layers, seed=0)
        layouts: dict = {}
        convert_s = {}
        for storage in a.hidden_states_dtypes.split(","):
            pt = src if storage == "bf16" else reencode(src, root / f"pt-{storage}", storage)
            suffix = "" if storage == "bf16" else f"-{storage}"
            t0 = time.perf_counter()
            convert_pt_to_safetensors(pt, root / f"st{suffix}", shard_tokens=a.shard_tokens)
            convert_s[storage] = time.perf_counter() - t0
            layouts[f"pt{suffix}"] = pt
            layouts[f"safetensors{suffix}"] = root / f"st{suffix}"
            if a.public and storage == "bf16":
                from to_public_format import convert

                convert(src, root / "public")
                layouts["public"] = root / "public"
        tokens = a.samples * a.seq_len
        results: dict = {"layouts": {}}
        rng = random.Random(0)
        for name, directory in layouts.items():

            def fresh_loader():
                # A new store per pass: an open store keeps shards memory-mapped, and
                # mapped pages cannot be evicted, so "cold" would be warm.
                if name == "public":
                    return public_loader(directory), None
                st = open_sample_store(directory)
                return st.load, st

            order = list(range(a.samples))
            rng.shuffle(order)
            entry: dict = {"disk_bytes": dir_bytes(directory), "bytes_per_token": dir_bytes(directory) / tokens}
            # cold: evict our files, read everything once in shuffled order
            colds, warms = [], []
            for _ in range(a.repeats):
                load = store = None
                gc.collect()
                evict(directory)
                load, store = fresh_loader()
                colds.append(time_reads(load, a.samples, order))
                warms.append(time_reads(load, a.samples, order))
            best = lambda runs: max(runs, key=lambda r: r["samples_per_s"])  # noqa: E731
            entry["cold"] = best(colds)
            entry["warm"] = best(warms)
            entry["cold_all_samples_per_s"] = [r["samples_per_s"] for r in colds]
            entry["warm_all_samples_per_s"] = [r["samples_per_s"] for r in warms]
            if name != "public":
                collate = Eagle3Collator(a.seq_len)
                sides = {"": Eagle3Dataset(store, max_len=a.seq_len)}
                if "fp8" in name:  # the same data dequantised per sample in the loader, as before
                    sides["host_dequant_"] = Eagle3Dataset(HostDequantised(store), max_len=a.seq_len)
                t: dict = {k: [] for k in sides}
                t_ready: dict = {k: [] for k in sides}
                cpu = torch.device("cpu")
                for _ in range(a.repeats):  # the two sides alternate, so load changes hit both
                    for side, ds in sides.items():
                        start = time.perf_counter()
                        for i in order:
                            batch = collate([ds[i]])
                        t[side].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        for i in order:
                            ready = to_device(collate([ds[i]]), cpu, torch.bfloat16)  # eager: done on return
                        t_ready[side].append(time.perf_counter() - start)
                        entry[f"{side}batch_hidden_bytes_per_token"] = batch_bytes(batch) / batch["input_ids"].numel()
                for side in sides:
                    entry[f"{side}dataset_collate_samples_per_s"] = a.samples / min(t[side])
                    entry[f"{side}dataset_collate_tokens_per_s"] = tokens / min(t[side])
                    entry[f"{side}step_input_samples_per_s"] = a.samples / min(t_ready[side])
                    entry[f"{side}step_input_tokens_per_s"] = tokens / min(t_ready[side])
                del batch, ready
            results["layouts"][name] = entry
            log(
                f"{name:12s} warm {fmt(entry['warm']['samples_per_s'])} samples/s {fmt(entry['warm']['mb_per_s'])} MB/s | "
                f"cold {fmt(entry['cold']['samples_per_s'])} samples/s {fmt(entry['cold']['mb_per_s'])} MB/s | "
                f"{fmt(entry['bytes_per_token'])} B/token"
                + (f" | loader {fmt(entry['dataset_collate_samples_per_s'])} samples/s, + to_device "
                   f"{fmt(entry['step_input_samples_per_s'])} samples/s, batch "
                   f"{fmt(entry['batch_hidden_bytes_per_token'])} B/token" if name != "public" else "")
                + (f" | host-dequantised loader {fmt(entry['host_dequant_dataset_collate_samples_per_s'])}, + to_device "
                   f"{fmt(entry['host_dequant_step_input_samples_per_s'])} samples/s" if "fp8" in name else "")
            )
        results["convert_seconds"] = convert_s
        results["params"] = {
            "samples": a.samples, "seq_len": a.seq_len, "hidden": a.hidden, "layers": a.layers,
            "dtype": "bfloat16", "hidden_states_dtypes": a.hidden_states_dtypes, "repeats": a.repeats, "shard_tokens": a.shard_tokens,
            "ideal_bytes_per_token": a.layers * a.hidden * 2,
            "bytes_per_sample": a.layers * a.hidden * 2 * a.seq_len,
        }
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-tokens", type=int, default=1 << 16)
    ap.add_argument("--no-public", dest="public", action="store_false")
    ap.add_argument("--hidden-states-dtypes", default="bf16",
                    help="comma-separated storages to measure: bf16 and/or fp8 (default bf16)")
    ap.add_argument("--tmp", default=None, help="where to write the temporary data (default: $TMPDIR)")
    ap.add_argument("--name", default=None, help="results file name (default: dataload_h<H>_l<L>)")
    a = ap.parse_args(argv)
    for storage in a.hidden_states_dtypes.split(","):
        if storage not in ("bf16", "fp8"):
            ap.error(f"--hidden-states-dtypes: {storage!r} is not bf16 or fp8")
    res = run(a)
    res["params"]["uptime"] = os.popen("uptime").read().strip()
    name = a.name or f"dataload_h{a.hidden}_l{a.seq_len}"
    path = write_result(name, res)
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
