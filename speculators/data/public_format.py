"""The hidden-state layout of the public `speculators` package (0.9.0), read and written.

Layout (checked against the public package: its ``train/data.py`` ArrowDataset and
``hs_connectors`` FileTransfer read it; vLLM's hidden-states connector writes the files):

* ``DIR`` is a ``datasets.Dataset.save_to_disk`` directory with one row per sample and
  the columns ``input_ids``, ``loss_mask`` and ``seq_len`` (= ``len(input_ids)``);
* ``DIR/hidden_states/hs_<i>.safetensors`` belongs to row ``i`` and holds
  ``token_ids [L]`` (int64, equal to the row's input_ids) and ``hidden_states [L, K, H]``
  (K captured layers, the verifier's final layer -- before its final norm -- last).

The values and the layer convention are the ones our own format stores, so a sample
moves between layouts unchanged. The public layout does not record which verifier
layers were captured; we keep them in an optional ``data_config.json`` beside it
(``format: "public"``), which the public package ignores. The conversions to and from
our layouts are in `speculators.data.public_convert`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from speculators.data import data_config as dc
from speculators.data.data_config import DATA_CONFIG_NAME
from speculators.data.sample_store import CorruptSampleError, FileSampleStore, OnCorrupt, SampleSchema, first_line
from speculators.errors import UserError

HS_DIR = "hidden_states"
PUBLIC_FORMAT = "public"
_HS_NAME = re.compile(r"^hs_(\d+)\.safetensors$")


def hs_file_name(index: int) -> str:
    return f"hs_{index}.safetensors"


def is_public_layout(directory: str | os.PathLike) -> bool:
    """A saved arrow dataset with a ``hidden_states/`` folder beside it."""
    d = Path(directory)
    return (d / HS_DIR).is_dir() and ((d / "dataset_info.json").is_file() or (d / "state.json").is_file())


def _load_rows(directory: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(directory))
    except Exception as exc:
        raise UserError(f"{directory}: cannot load the arrow dataset of the public layout ({exc})") from None
    missing = [c for c in ("input_ids", "loss_mask") if c not in ds.column_names]
    if missing:
        raise UserError(f"{directory}: the public-layout dataset lacks column(s) {missing}")
    return ds.with_format(None)


class PublicSampleStore(FileSampleStore):
    """Reads the public layout through the sample-store protocol, like our own stores.

    Row ``i`` of the arrow dataset pairs with ``hs_<i>.safetensors``; rows without a
    file are left out (the public trainer would generate them online). A file whose
    ``token_ids`` differ from the row's ``input_ids`` is corrupt (the public trainer
    drops such a sample too).
    """

    def __init__(self, directory: str | os.PathLike, on_corrupt: OnCorrupt = "skip", config: dict[str, Any] | None = None):
        super().__init__(directory, on_corrupt)
        self.where = str(self.directory / HS_DIR)  # the dimensions come from the files
        self.rows = _load_rows(self.directory)
        hs_dir = self.directory / HS_DIR
        found = {int(m.group(1)) for name in os.listdir(hs_dir) if (m := _HS_NAME.match(name))}
        self.sample_indices = sorted(i for i in found if i < len(self.rows))
        if not self.sample_indices:
            raise UserError(f"{hs_dir}: no hs_<i>.safetensors files for the dataset's rows")
        first = self._open(self.sample_indices[0])
        shape = tuple(first["hidden_states"].shape)
        if len(shape) != 3:
            raise UserError(f"{self._path(self.sample_indices[0])}: hidden_states must be [L, K, H], is {list(shape)}")
        num_layers, hidden = int(shape[1]), int(shape[2])
        self.config: dict[str, Any] = {
            "format": PUBLIC_FORMAT,
            "hidden_size": hidden,
            "num_layers": num_layers,
            "hidden_states_dtype": str(first["hidden_states"].dtype).replace("torch.", ""),
        }
        for key in ("layer_ids", "num_hidden_layers", "model"):
            if config and config.get(key) is not None:
                self.config[key] = config[key]
        if "layer_ids" in self.config and len(self.config["layer_ids"]) != num_layers:
            raise UserError(
                f"{self.directory / DATA_CONFIG_NAME}: layer_ids {self.config['layer_ids']} name "
                f"{len(self.config['layer_ids'])} layers, the files hold {num_layers}"
            )
        self.schema = SampleSchema(num_layers, hidden)
        seq = self.rows["seq_len"] if "seq_len" in self.rows.column_names else None
        self._lengths = [
            int(seq[i]) if seq is not None else len(self.rows[i]["input_ids"]) for i in self.sample_indices
        ]

    def lengths(self) -> list[int]:
        return self._lengths

    def _path(self, index: int) -> Path:
        return self.directory / HS_DIR / hs_file_name(index)

    def _open(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._path(index)))

    def read_sample(self, i: int) -> dict[str, Any]:
        index = self.sample_indices[i]
        path = self._path(index)
        try:
            payload = self._open(index)
        except Exception as exc:
            raise CorruptSampleError(f"{path}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc
        if "token_ids" not in payload or "hidden_states" not in payload:
            raise CorruptSampleError(f"{path}: needs token_ids and hidden_states, has {sorted(payload)}")
        row = self.rows[index]
        ids = payload["token_ids"].long()
        if ids.tolist() != list(row["input_ids"]):
            raise CorruptSampleError(f"{path}: token_ids differ from row {index} of the dataset's input_ids")
        hs = payload["hidden_states"]
        sample = {
            "input_ids": ids,
            "hidden_states": list(hs.unbind(1)),
            "loss_mask": torch.tensor(row["loss_mask"], dtype=torch.long),
        }
        self.schema.check(sample, str(path))
        return sample


def read_public_sidecar(directory: Path) -> dict[str, Any] | None:
    """The data_config.json our converter leaves beside a public-layout directory (layer ids), if any."""
    config = dc.load(directory / DATA_CONFIG_NAME)
    return config if config is not None and config.get("format") == PUBLIC_FORMAT else None


def open_public_store(directory: str | os.PathLike, on_corrupt: OnCorrupt = "skip") -> PublicSampleStore:
    directory = Path(directory)
    if not is_public_layout(directory):
        raise UserError(
            f"{directory} is not in the public speculators layout (a saved arrow dataset with "
            "a hidden_states/ folder of hs_<i>.safetensors files)"
        )
    return PublicSampleStore(directory, on_corrupt, read_public_sidecar(directory))
