"""Extra peak RSS of DFlash's masked attention on the CPU, per [Q, T + Q] mask element.

    OMP_NUM_THREADS=1 python bench/dflash_sdpa_memory.py [--out bench/results/dflash_sdpa_memory.json]

The factors behind speculators.config.memory.estimate_dflash_train_memory's attention part:
for the fused kernel the CPU picks (a float copy of the bool mask per layer, no scores) and
for the math path (float32 scores per head: the path a GQA draft takes on CUDA). Each case
runs forward and backward of `layers` SDPA calls that share one bool mask, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
heads, kv, q_len, t, layers, dtype, backend = sys.argv[1:]
heads, kv, q_len, t, layers, dt = int(heads), int(kv), int(q_len), int(t), int(layers), getattr(torch, dtype)
qs = [torch.randn(1, heads, q_len, 16, dtype=dt, requires_grad=True) for _ in range(layers)]
ks = [torch.randn(1, kv, t + q_len, 16, dtype=dt, requires_grad=True) for _ in range(layers)]
mask = torch.ones(1, 1, q_len, t + q_len, dtype=torch.bool)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with sdpa_kernel(SDPBackend.MATH if backend == "math" else SDPBackend.FLASH_ATTENTION):
    outs = [F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=heads != kv) for q, k in zip(qs, ks)]
    sum(o.float().sum() for o in outs).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    heads, kv, q_len, t = 4, 2, 2048, 4096
    rows = []
    for backend in ("fused", "math"):
        for dtype in ("float32", "bfloat16"):
            for layers in (1, 2):
                out = subprocess.run([sys.executable, "-c", CHILD, str(heads), str(kv), str(q_len), str(t), str(layers),
                                      dtype, backend], capture_output=True, text=True, check=True)
                extra = int(out.stdout.split()[-1])
                row = {"backend": backend, "dtype": dtype, "layers": layers, "heads": heads, "kv_heads": kv,
                       "queries": q_len, "keys": t + q_len,
                       "bytes_per_mask_element": round(extra / (q_len * (t + q_len)), 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": "2-core x86-64 CPU (shared)", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
