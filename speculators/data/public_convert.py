"""Conversions between the public `speculators` package's layout and ours (`convert-data --to public`,
and ``--to pt|safetensors`` from a public-layout directory).

Reading each layout is its own module's job (`speculators.data.formats`, `speculators.data.public_format`);
this one imports both, so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from speculators.data import data_config as dc
from speculators.data.data_config import DATA_CONFIG_NAME
from speculators.data.formats import DATA_FORMAT_VERSION, check_new_output, copy_samples_to_pt, open_sample_store
from speculators.data.public_format import HS_DIR, PUBLIC_FORMAT, PublicSampleStore, hs_file_name, open_public_store
from speculators.data.sample_store import OnCorrupt, readable_samples
from speculators.errors import UserError


def _write_rows(dst: Path, rows: dict[str, list]) -> None:
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int64")),
            "loss_mask": datasets.Sequence(datasets.Value("int64")),
            "seq_len": datasets.Value("int64"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.set_format(type="torch")  # as the public prepare-data saves it
    ds.save_to_disk(str(dst))


def convert_to_public(src: str | os.PathLike, dst: str | os.PathLike, on_corrupt: OnCorrupt = "skip") -> dict[str, Any]:
    """Write any of our layouts (pt or safetensors shards) in the public layout.

    Rows are renumbered 0..n-1 in sample order (the public layout needs a dense range);
    ``data_config.json`` keeps the layer ids and the original sample index of each row.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    check_new_output(src, dst)
    store = open_sample_store(src, on_corrupt="raise")
    if isinstance(store, PublicSampleStore):
        raise UserError(f"{src} is already in the public layout")
    (dst / HS_DIR).mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"input_ids": [], "loss_mask": [], "seq_len": []}
    source_index: list[int] = []
    skipped: list[int] = []
    for index, sample in readable_samples(store, on_corrupt, skipped):
        row = len(rows["input_ids"])
        ids = sample["input_ids"].long().contiguous()
        stacked = torch.stack(list(sample["hidden_states"]), dim=1).contiguous()  # [L, K, H]
        save_file({"hidden_states": stacked, "token_ids": ids}, str(dst / HS_DIR / hs_file_name(row)))
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append(sample["loss_mask"].long().tolist())
        rows["seq_len"].append(int(ids.shape[0]))
        source_index.append(int(index))
    _write_rows(dst, rows)
    config = {
        "format": PUBLIC_FORMAT,
        "layer_ids": list(store.config["layer_ids"]) if store.config.get("layer_ids") else None,
        "hidden_size": int(store.config["hidden_size"]),
        "converted_from": str(src),
        "source_sample_index": source_index,
        "skipped_corrupt": skipped,
    }
    for key in ("num_hidden_layers", "model"):
        if key in store.config:
            config[key] = store.config[key]
    dc.write(dst / DATA_CONFIG_NAME, config)
    return config


def convert_from_public(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layer_ids: Iterable[int] | None = None,
    num_hidden_layers: int | None = None,
    on_corrupt: OnCorrupt = "skip",
) -> dict[str, Any]:
    """Write a public-layout directory as our ``pt`` layout (data format version 1).

    The public layout does not say which verifier layers its K stored layers are;
    ``layer_ids`` (or the ``data_config.json`` our converter leaves there) must.
    """
    src, dst = Path(src), Path(dst)
    check_new_output(src, dst)
    store = open_public_store(src, on_corrupt="raise")
    ids_given = [int(x) for x in layer_ids] if layer_ids is not None else None
    recorded = store.config.get("layer_ids")
    if ids_given is None and recorded is None:
        raise UserError(
            f"{src}: the public layout does not record which verifier layers it holds; pass "
            f"--layer-ids with {store.schema.num_layers} ids, the final layer last (the public "
            "0.9.0 default is 2, n//2, n-3 and n for an n-layer verifier)"
        )
    chosen = ids_given if ids_given is not None else [int(x) for x in recorded]
    if len(chosen) != store.schema.num_layers:
        raise UserError(f"--layer-ids {chosen}: the files hold {store.schema.num_layers} layers")
    if recorded is not None and ids_given is not None and list(recorded) != ids_given:
        raise UserError(f"--layer-ids {ids_given} contradicts {src / DATA_CONFIG_NAME} ({recorded})")
    n_layers = num_hidden_layers if num_hidden_layers is not None else store.config.get("num_hidden_layers")
    lengths, skipped = copy_samples_to_pt(store, dst, on_corrupt)
    config: dict[str, Any] = {
        "version": DATA_FORMAT_VERSION,
        "format": "pt",
        "model": store.config.get("model"),
        "layer_ids": chosen,
        "hidden_size": store.schema.hidden_size,
        "hidden_states_dtype": store.config["hidden_states_dtype"],
        "converted_from": str(src),
        "skipped_corrupt": skipped,
        "complete": True,
        "num_samples": len(lengths),
        "lengths": lengths,
    }
    if n_layers is not None:
        config["num_hidden_layers"] = int(n_layers)
    dc.write(dst / DATA_CONFIG_NAME, config)
    return config
