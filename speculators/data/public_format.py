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
(``format: "public"``), which the public package ignores.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from speculators.errors import UserError

logger = logging.getLogger(__name__)

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


class PublicSampleStore:
    """Reads the public layout; the same `SampleStore` protocol as our own stores.

    Row ``i`` of the arrow dataset pairs with ``hs_<i>.safetensors``; rows without a
    file are left out (the public trainer would generate them online). A file whose
    ``token_ids`` differ from the row's ``input_ids`` is corrupt (the public trainer
    drops such a sample too).
    """

    def __init__(self, directory: str | os.PathLike, on_corrupt: str = "skip", config: dict[str, Any] | None = None):
        from speculators.data.formats import SampleSchema, _CorruptPolicy

        self.directory = Path(directory)
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
                f"{self.directory / 'data_config.json'}: layer_ids {self.config['layer_ids']} name "
                f"{len(self.config['layer_ids'])} layers, the files hold {num_layers}"
            )
        self.schema = SampleSchema(num_layers, hidden)
        self._policy = _CorruptPolicy(on_corrupt)  # type: ignore[arg-type]
        seq = self.rows["seq_len"] if "seq_len" in self.rows.column_names else None
        self._lengths = [
            int(seq[i]) if seq is not None else len(self.rows[i]["input_ids"]) for i in self.sample_indices
        ]

    def __len__(self) -> int:
        return len(self.sample_indices)

    def lengths(self) -> list[int]:
        return self._lengths

    def _path(self, index: int) -> Path:
        return self.directory / HS_DIR / hs_file_name(index)

    def _open(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._path(index)))

    def _read(self, i: int) -> dict[str, Any]:
        from speculators.data.formats import CorruptSampleError, _first_line

        index = self.sample_indices[i]
        path = self._path(index)
        try:
            payload = self._open(index)
        except Exception as exc:
            raise CorruptSampleError(f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)})") from exc
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

    def load(self, i: int) -> dict[str, Any]:
        return self._policy.load_with_policy(i, len(self), self._read)


# ---------------------------------------------------------------- conversion


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


def _check_new_output(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        raise UserError("--output-dir must differ from --data-path (convert-data writes a new directory)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"--output-dir {dst} exists and is not empty; choose a new directory")


def convert_to_public(src: str | os.PathLike, dst: str | os.PathLike, on_corrupt: str = "skip") -> dict[str, Any]:
    """Write any of our layouts (pt or safetensors shards) in the public layout.

    Rows are renumbered 0..n-1 in sample order (the public layout needs a dense range);
    ``data_config.json`` keeps the layer ids and the original sample index of each row.
    """
    from safetensors.torch import save_file

    from speculators.data import data_config as dc
    from speculators.data.formats import DATA_CONFIG_NAME, open_sample_store, readable_samples

    src, dst = Path(src), Path(dst)
    _check_new_output(src, dst)
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
        "layer_ids": list(store.config["layer_ids"]) if store.config.get("layer_ids") else None,  # type: ignore[attr-defined]
        "hidden_size": int(store.config["hidden_size"]),  # type: ignore[attr-defined]
        "converted_from": str(src),
        "source_sample_index": source_index,
        "skipped_corrupt": skipped,
    }
    for key in ("num_hidden_layers", "model"):
        if key in store.config:  # type: ignore[attr-defined]
            config[key] = store.config[key]  # type: ignore[attr-defined]
    dc.write(dst / DATA_CONFIG_NAME, config)
    return config


def convert_from_public(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layer_ids: Iterable[int] | None = None,
    num_hidden_layers: int | None = None,
    on_corrupt: str = "skip",
) -> dict[str, Any]:
    """Write a public-layout directory as our ``pt`` layout (data format version 1).

    The public layout does not say which verifier layers its K stored layers are;
    ``layer_ids`` (or the ``data_config.json`` our converter leaves there) must.
    """
    from speculators.data import data_config as dc
    from speculators.data.formats import DATA_CONFIG_NAME, DATA_FORMAT_VERSION, readable_samples, write_pt_sample

    src, dst = Path(src), Path(dst)
    _check_new_output(src, dst)
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
    dst.mkdir(parents=True, exist_ok=True)
    lengths: dict[str, int] = {}
    skipped: list[int] = []
    for index, sample in readable_samples(store, on_corrupt, skipped):
        write_pt_sample(dst, index, {**sample, "hidden_states": [h.contiguous() for h in sample["hidden_states"]]})
        lengths[str(index)] = int(sample["input_ids"].shape[0])
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


def read_public_sidecar(directory: Path) -> dict[str, Any] | None:
    from speculators.data import data_config as dc

    config = dc.load(directory / "data_config.json")
    return config if config is not None and config.get("format") == PUBLIC_FORMAT else None


def open_public_store(directory: str | os.PathLike, on_corrupt: str = "skip") -> PublicSampleStore:
    directory = Path(directory)
    if not is_public_layout(directory):
        raise UserError(
            f"{directory} is not in the public speculators layout (a saved arrow dataset with "
            "a hidden_states/ folder of hs_<i>.safetensors files)"
        )
    return PublicSampleStore(directory, on_corrupt, read_public_sidecar(directory))
