"""Measured peak RSS of `speculators train` on the CPU vs speculators.config.memory's estimate.

    OMP_NUM_THREADS=1 python bench/memory_estimate.py [--seq 256 1024 2048] [--out bench/results/memory_estimate.json]

Each length trains a few steps of a 1-layer draft on the tiny 8-layer Llama (hidden 64) in a
fresh process; the peak RSS is read from getrusage(RUSAGE_CHILDREN).
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from speculators.config.memory import estimate_train_memory, read_verifier_dims
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
            out = subprocess.run(argv, capture_output=True, text=True, check=False)
            peak = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK")]
            if out.returncode != 0 or not peak:
                print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                return 1
            est = estimate_train_memory(dims, total_seq_len=seq, ttt_steps=args.ttt_steps, num_aux_layers=3)
            row = {"total_seq_len": seq, "measured_peak_mib": round(peak[0] / 1024), "estimate_mib":
                   round(est.total / (1 << 20)), "parts_mib": {k: round(v / (1 << 20)) for k, v in est.parts.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:  # after each length: a slow machine still leaves the finished rows
                Path(args.out).write_text(json.dumps({"machine": "2-core x86-64 CPU (shared)", "ttt_steps":
                                                      args.ttt_steps, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
