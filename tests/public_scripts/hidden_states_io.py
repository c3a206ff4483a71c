"""Public-package side of tests/test_public_data_format.py (runs in the public venv).

usage: hidden_states_io.py OURS_AS_PUBLIC PUBLIC_OUT DUMP_DIR HIDDEN VOCAB

1. Reads OURS_AS_PUBLIC (written by our `convert-data --to public`) with the public
   trainer's ArrowDataset and dumps what it yields.
2. Writes PUBLIC_OUT the public way: the arrow dataset by the public package's own
   `build_speculator_training_dataset` + `save_to_disk` (as its prepare-data does), and
   hs_<i>.safetensors files with the tensors vLLM's hidden-states connector saves; every
   file passes the public `check_hidden_states` and is read back by its ArrowDataset,
   whose items are dumped too.
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from speculators.data_generation.offline import check_hidden_states
from speculators.data_generation.preprocessing import build_speculator_training_dataset
from speculators.train.data import ArrowDataset

ours_as_public, public_out, dump = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
hidden, vocab = int(sys.argv[4]), int(sys.argv[5])
KEYS = ("hidden_states", "input_ids", "verifier_last_hidden_states", "loss_mask")


def dump_items(ds, name):
    out = {}
    for i in range(len(ds)):
        item = ds[i]
        assert isinstance(item, dict), f"sample {i} unavailable: {item}"
        for k in KEYS:
            out[f"{i}.{k}"] = item[k].contiguous()
    save_file(out, str(dump / name))
    print(name, len(ds))


dump_items(ArrowDataset(max_len=4096, datapath=str(ours_as_public), on_missing="raise"), "read_by_public.safetensors")

g = torch.Generator().manual_seed(7)
rows = {"input_ids": [], "loss_mask": []}
for n in (12, 20, 9):
    rows["input_ids"].append(torch.randint(0, vocab, (n,), generator=g).tolist())
    rows["loss_mask"].append([0] * (n // 2) + [1] * (n - n // 2))
prepared = build_speculator_training_dataset(Dataset.from_dict(rows), processor=None, max_length=64, num_proc=1)
prepared.save_to_disk(str(public_out))
(public_out / "hidden_states").mkdir()
for i, ids in enumerate(rows["input_ids"]):
    hs = torch.randn(len(ids), 4, hidden, generator=g).to(torch.bfloat16)
    path = public_out / "hidden_states" / f"hs_{i}.safetensors"
    save_file({"hidden_states": hs, "token_ids": torch.tensor(ids, dtype=torch.long)}, str(path))
    check_hidden_states(load_file(str(path)), ids)
dump_items(ArrowDataset(max_len=4096, datapath=str(public_out), on_missing="raise"), "public_written.safetensors")
