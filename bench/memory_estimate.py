"""Measured peak RSS of `speculators train` on the CPU vs speculators.config.memory's estimate.

    OMP_NUM_THREADS=1 python bench/memory_estimate.py [--seq 256 1024 2048] [--out bench/results/memory_estimate.json]
    OMP_NUM_THREADS=1 python bench/memory_estimate.py --algorithm dflash --out bench/results/memory_estimate_dflash.json

Each length trains a few steps of a 1-layer draft (EAGLE-3, or DFlash with blocks of
--ttt-steps + 1 tokens and --num-anchors blocks per row) on the tiny 8-layer Llama (hidden 64)
in a fresh process; the peak RSS is the child's own getrusage(RUSAGE_SELF) maximum.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the synthetic data writer lives in tests/support


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--ttt-steps", type=int, default=3)
    ap.add_argument("--algorithm", choices=["eagle3", "dflash"], default="eagle3")
    ap.add_argument("--num-anchors", type=int, default=512, help="dflash: --dflash-num-anchors")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from speculators.config.memory import estimate_dflash_train_memory, estimate_train_memory, read_verifier_dims
    from speculators.tiny.builders import build_tiny_verifier
    from tests.support.synthetic import write_synthetic_hidden_states

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        verifier = build_tiny_verifier(tmp / "v")
        dims = read_verifier_dims(str(verifier))
        for seq in args.seq:
            # 256-token samples packed into rows of `seq` tokens (generating long samples is slow)
            data = write_synthetic_hidden_states(verifier, tmp / f"hs{seq}", num_samples=max(4, 4 * seq // 256),
                                                 seq_len=min(seq, 256))
            code = (
                "import resource, sys\n"
                "from speculators.cli import main\n"
                "rc = main(sys.argv[1:])\n"
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
                "sys.exit(rc)\n"
            )
            argv = [sys.executable, "-c", code, "train", "--verifier-name-or-path", str(verifier),
                    "--data-path", str(data), "--save-path", str(tmp / f"ck{seq}"), "--epochs", "1",
                    "--total-seq-len", str(seq), "--ttt-steps", str(args.ttt_steps), "--max-steps", "2",
                    "--train-data-ratio", "1.0", "--log-freq", "1000"]
            if args.algorithm == "dflash":
                argv += ["--algorithm", "dflash", "--dflash-num-anchors", str(args.num_anchors)]
            out = subprocess.run(argv, capture_output=True, text=True, check=False)
            peak = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK")]
            if out.returncode != 0 or not peak:
                print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                return 1
            if args.algorithm == "dflash":
                est = estimate_dflash_train_memory(dims, total_seq_len=seq, block_size=args.ttt_steps + 1,
                                                   num_anchors=args.num_anchors, num_layers=1, num_aux_layers=3)
            else:
                est = estimate_train_memory(dims, total_seq_len=seq, ttt_steps=args.ttt_steps, num_aux_layers=3)
            measured = round(peak[0] / 1024)
            row = {"total_seq_len": seq, "measured_peak_mib": measured, "estimate_mib": round(est.total / (1 << 20)),
                   "error_pct": round(100 * (est.total / (1 << 20) - measured) / measured, 1),
                   "parts_mib": {k: round(v / (1 << 20)) for k, v in est.parts.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:  # after each length: a slow machine still leaves the finished rows
                meta = {"machine": "2-core x86-64 CPU (shared)", "algorithm": args.algorithm,
                        "ttt_steps": args.ttt_steps}
                if args.algorithm == "dflash":
                    meta |= {"block_size": args.ttt_steps + 1, "num_anchors": args.num_anchors}
                Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
