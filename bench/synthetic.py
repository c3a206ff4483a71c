"""Synthetic hidden-state datasets in data format version 1 (what `speculators datagen` writes).

Benchmarks need data of a realistic *shape* (hidden size, layers, sequence length, bf16)
without running a real verifier. The values are not noise: every layer is a fixed random
projection of the token's embedding (plus noise), and the verifier's final layer at `t`
is a projection of token `t+1`'s embedding, so a draft can learn something and loss
curves go down the way they do on real data.

    python bench/synthetic.py OUT --samples 8 --seq-len 512 --hidden 1024 --vocab 32000

Pure torch; never imports `speculators` (the public-package runner shares it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def write_v1_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    seq_len: int,
    hidden_size: int,
    vocab_size: int,
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    vary_length: bool = False,
) -> Path:
    """Write `data_<i>.pt` + `data_config.json`; return the directory.

    `vary_length` draws lengths uniformly from [seq_len/4, seq_len] (packing tests);
    otherwise every sample is exactly `seq_len` tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    # Fixed per-dataset structure: token embeddings and one projection per layer.
    base_dim = min(hidden_size, 256)
    embed = torch.randn(vocab_size, base_dim, generator=g)
    proj = [torch.randn(base_dim, hidden_size, generator=g) / base_dim**0.5 for _ in range(num_layers)]
    # Zipf-like token distribution, so frequent tokens dominate as in text.
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    for i in range(num_samples):
        length = seq_len
        if vary_length:
            length = int(torch.randint(max(2, seq_len // 4), seq_len + 1, (1,), generator=g))
        ids = torch.multinomial(probs, length, replacement=True, generator=g)
        e = embed[ids]
        nxt = embed[torch.cat([ids[1:], ids[-1:]])]
        layers = []
        for k in range(num_layers):
            src = nxt if k == num_layers - 1 else e
            h = src @ proj[k] + 0.1 * torch.randn(length, hidden_size, generator=g)
            layers.append(h.to(dtype))
        mask = torch.zeros(length, dtype=torch.long)
        mask[length // 4 :] = 1  # the "assistant" part
        torch.save({"input_ids": ids.long(), "hidden_states": layers, "loss_mask": mask}, out / f"data_{i}.pt")
    n_layers_verifier = 32
    config = {
        "version": 1,
        "format": "pt",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": {"torch": torch.__version__},
        "model": "synthetic",
        "data": f"synthetic seed={seed}",
        "layer_ids": [2, n_layers_verifier // 2, n_layers_verifier - 3, n_layers_verifier][-num_layers:],
        "hidden_size": hidden_size,
        "num_hidden_layers": n_layers_verifier,
        "num_samples": num_samples,
        "vocab_size": vocab_size,
        "schema": {
            "input_ids": "int64[L]",
            "hidden_states": f"list[{num_layers}] of {str(dtype).replace('torch.', '')}[L,{hidden_size}]",
            "loss_mask": "int64[L]",
        },
    }
    (out / "data_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vary-length", action="store_true")
    a = ap.parse_args()
    path = write_v1_dataset(a.out, a.samples, a.seq_len, a.hidden, a.vocab, a.layers, a.seed, vary_length=a.vary_length)
    print(f"wrote {a.samples} samples to {path} ({dir_bytes(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
