"""In-process A/B of the counted-rows TTT unroll: one trainer, steps alternating sparse / dense.

Both variants run in the same process on the same weights and batches kind, one step each in
turn, so load drift on a shared machine hits both alike; the ratio is taken per adjacent pair
and reported as its median with the range. (The cross-process side by side,
`bench/side_by_side.py --variants ours,ours-dense,...`, measures the same thing between runs.)

    python bench/ab_sparse_ttt.py --data DIR --shape llama8b --seq-len 256 --pairs 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import log, write_result  # noqa: E402
from configs import get_shape  # noqa: E402
from ours_runner import build_trainer, iter_steps  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--shape", default="llama8b")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    shape = get_shape(a.shape, a.seq_len)
    tr, _ = build_trainer(shape, a.data, a.seq_len, 1e-4, 0, "auto", a.precision, "auto", epochs=1)
    stream = iter_steps(tr, 2 * a.pairs + 1)
    tr.train_step(next(stream))  # warm-up
    times = {"sparse": [], "dense": []}
    for i in range(a.pairs):
        order = ("sparse", "dense") if i % 2 == 0 else ("dense", "sparse")
        for v in order:
            tr.objective.skip_uncounted = v == "sparse"
            batch = next(stream)
            t0 = time.perf_counter()
            stats, _ = tr.train_step(batch)
            stats.cpu()
            times[v].append(time.perf_counter() - t0)
            log(f"pair {i + 1}: {v} {times[v][-1]:.2f} s")
    per = [d / s for s, d in zip(times["sparse"], times["dense"])]
    result = {"shape": shape.to_dict(), "seq_len": a.seq_len, "precision": a.precision, "pairs": a.pairs,
              "step_s": times, "speedup_per_pair": per, "speedup_median": statistics.median(per),
              "speedup_range": [min(per), max(per)], "load": os.getloadavg()}
    path = write_result(a.name or f"ab_sparse_ttt_{shape.name}_{a.precision}", result)
    print(f"sparse vs dense TTT unroll: {statistics.median(per):.3f}x (per pair {', '.join(f'{x:.3f}' for x in per)}); "
          f"step s sparse {statistics.median(times['sparse']):.2f}, dense {statistics.median(times['dense']):.2f}; "
          f"load {os.getloadavg()}")
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
