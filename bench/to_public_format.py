"""Convert our hidden-state data (format version 1, `data_<i>.pt`) to the layout the public
`speculators` 0.9.0 trainer reads, so both trainers see the same samples.

Public 0.9.0 layout (read from its `speculators/train/data.py` and `hs_connectors/transfer.py`):

* `OUT/` is a `datasets.Dataset.save_to_disk` directory, torch format, with columns
  `input_ids`, `loss_mask` and `seq_len` (one row per sample, row i = sample i);
* `OUT/hidden_states/hs_<i>.safetensors` holds `hidden_states [L, K, H]` (K layers, the
  verifier's final layer last) and `token_ids [L]`.

    python bench/to_public_format.py OUR_DATA_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

_PT = re.compile(r"^data_(\d+)\.pt$")


def convert(src: str | Path, dst: str | Path) -> Path:
    from datasets import Dataset
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    files = sorted(
        ((int(m.group(1)), p) for p in src.iterdir() if (m := _PT.match(p.name))), key=lambda x: x[0]
    )
    if not files:
        raise SystemExit(f"{src}: no data_<i>.pt files (expected data format version 1)")
    indices = [i for i, _ in files]
    if indices != list(range(len(indices))):
        raise SystemExit(f"{src}: sample indices are not 0..{len(indices) - 1}; the public layout needs a dense range")
    (dst / "hidden_states").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"input_ids": [], "loss_mask": [], "seq_len": []}
    for i, path in files:
        sample = torch.load(path, weights_only=True)
        ids = sample["input_ids"].long()
        stacked = torch.stack(list(sample["hidden_states"]), dim=1).contiguous()  # [L, K, H]
        save_file({"hidden_states": stacked, "token_ids": ids.contiguous()}, str(dst / "hidden_states" / f"hs_{i}.safetensors"))
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append(sample["loss_mask"].long().tolist())
        rows["seq_len"].append(int(ids.shape[0]))
    ds = Dataset.from_dict(rows)
    ds.set_format(type="torch")
    ds.save_to_disk(str(dst))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    print(convert(a.src, a.dst))


if __name__ == "__main__":
    main()
