"""Data loading throughput of the offline hidden-state layouts.

Compares, on the same synthetic samples:

* `pt`          - one `data_<i>.pt` per sample (format version 1, what datagen writes),
                  read by `speculators.data.formats.PtSampleStore`;
* `safetensors` - the sharded layout from `convert_pt_to_safetensors`, read by
                  `SafetensorsSampleStore` (memory-mapped slices);
* `public`      - the public package's layout (`hs_<i>.safetensors`, one per sample) read
                  the way its `FileTransfer` does (`safetensors.torch.load_file`), for scale.

For each: samples/s and MB/s (hidden-state bytes delivered), with the page cache warm
(data read once before) and cold (our files evicted with posix_fadvise DONTNEED, which
touches only these files), plus `Eagle3Dataset` + collator throughput (shift + concat,
what a training step really waits for), and disk bytes per token.

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


def run(a) -> dict:
    from speculators.data.dataset import Eagle3Collator, Eagle3Dataset
    from speculators.data.formats import convert_pt_to_safetensors, open_sample_store

    root = Path(tempfile.mkdtemp(prefix="bench-dataload-", dir=a.tmp))
    try:
        src = root / "pt"
        log(f"writing {a.samples} synthetic samples H={a.hidden} K={a.layers} L={a.seq_len} bf16 to {src}")
        write_v1_dataset(src, a.samples, a.seq_len, a.hidden, vocab_size=32000, num_layers=a.layers, seed=0)
        t0 = time.perf_counter()
        convert_pt_to_safetensors(src, root / "st", shard_tokens=a.shard_tokens)
        convert_s = time.perf_counter() - t0
        layouts = {"pt": src, "safetensors": root / "st"}
        if a.public:
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
                ds = Eagle3Dataset(store, max_len=a.seq_len)
                collate = Eagle3Collator(a.seq_len)
                t = []
                for _ in range(a.repeats):
                    start = time.perf_counter()
                    for i in order:
                        batch = collate([ds[i]])
                    t.append(time.perf_counter() - start)
                entry["dataset_collate_samples_per_s"] = a.samples / min(t)
                entry["dataset_collate_tokens_per_s"] = tokens / min(t)
                del batch
            results["layouts"][name] = entry
            log(
                f"{name:12s} warm {fmt(entry['warm']['samples_per_s'])} samples/s {fmt(entry['warm']['mb_per_s'])} MB/s | "
                f"cold {fmt(entry['cold']['samples_per_s'])} samples/s {fmt(entry['cold']['mb_per_s'])} MB/s | "
                f"{fmt(entry['bytes_per_token'])} B/token"
            )
        results["convert_seconds"] = convert_s
        results["params"] = {
            "samples": a.samples, "seq_len": a.seq_len, "hidden": a.hidden, "layers": a.layers,
            "dtype": "bfloat16", "repeats": a.repeats, "shard_tokens": a.shard_tokens,
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
    ap.add_argument("--tmp", default=None, help="where to write the temporary data (default: $TMPDIR)")
    ap.add_argument("--name", default=None, help="results file name (default: dataload_h<H>_l<L>)")
    a = ap.parse_args(argv)
    res = run(a)
    name = a.name or f"dataload_h{a.hidden}_l{a.seq_len}"
    path = write_result(name, res)
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
