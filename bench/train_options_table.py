"""Markdown table of bench/train_options_sweep.sh's results.tsv: acceptance per setting and seed,
mean, and the seed spread (max - min). usage: python bench/train_options_table.py OUT_DIR/results.tsv"""

from __future__ import annotations

import sys
from collections import defaultdict
from statistics import mean


def main(path: str) -> None:
    runs: dict[str, dict[int, float]] = defaultdict(dict)
    times: dict[str, list[int]] = defaultdict(list)
    for line in open(path):
        name, seed, acc, train_s, _eval_s = line.rstrip("\n").split("\t")
        runs[name][int(seed)] = float(acc)
        times[name].append(int(train_s))
    seeds = sorted({s for r in runs.values() for s in r})
    print("| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max - min) | train s (mean) |")
    print("| --- |" + " --- |" * (len(seeds) + 3))
    for name, r in runs.items():
        vals = list(r.values())
        cells = " | ".join(f"{r[s]:.3f}" if s in r else "-" for s in seeds)
        spread = f"{max(vals) - min(vals):.3f}" if len(vals) > 1 else "-"
        print(f"| {name} | {cells} | {mean(vals):.3f} | {spread} | {mean(times[name]):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
