"""`data_config.json`: the seeds' nested structure on disk, one flat view for our readers.

Files are written in the public speculators documentation's structure (``"version": "2.0"``,
``reproducibility``, ``model``, ``data``, ``hidden_states``, ``generation``, ``format``), so
tools written for theirs read ours. Our readers (the sample stores, the trainer, datagen's
resume check, the online cache, the converters) work on a flat dict with the keys the first
version of the file had at its top level (``version`` = data format version, ``format`` =
layout name, ``model``, ``layer_ids``, ``hidden_size``, ...). `nest` and `flatten` map one
to the other; `flatten` passes a file of the first version through unchanged, so data
written before the change still loads. The mapping is documented in docs/data-pipeline.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from speculators.atomic import atomic_write_json
from speculators.errors import UserError

CONFIG_VERSION = "2.0"
DATA_CONFIG_NAME = "data_config.json"

FILE_PATTERNS = {
    "pt": "data_{idx}.pt",
    "safetensors": "shards/shard_{idx:05d}.safetensors",
    "public": "hidden_states/hs_{idx}.safetensors",
    "online": "data_{idx}.pt",
}
HIDDEN_STATES_DESCRIPTION = "Layers selected for EAGLE3 fusion and target logits"

# flat key -> (section, key in section) of the nested file; top-level keys map to (None, key)
_PLACES: dict[str, tuple[str | None, str]] = {
    "generated_at": (None, "generated_at"),
    "speculators_version": (None, "speculators_version"),
    "command": ("reproducibility", "command"),
    "packages": ("reproducibility", "package_versions"),
    "gpu": ("reproducibility", "gpu"),
    "model": ("model", "target_model_path"),
    "tensor_parallel_size": ("model", "tensor_parallel_size"),
    "max_model_len": ("model", "max_model_len"),
    "gpu_memory_utilization": ("model", "gpu_memory_utilization"),
    "hidden_size": ("model", "hidden_size"),
    "num_hidden_layers": ("model", "num_hidden_layers"),
    "num_samples": ("data", "num_samples"),
    "lengths": ("data", "lengths"),
    "layer_ids": ("hidden_states", "layer_ids"),
    "num_layers": ("hidden_states", "num_layers"),
    "hidden_states_dtype": ("hidden_states", "dtype"),
    "layer_convention": ("hidden_states", "layer_convention"),
    "cache_dir": ("generation", "cache_dir"),
    "backend": ("generation", "backend"),
    "generator": ("generation", "generator"),
    "batch_size": ("generation", "batch_size"),
    "complete": ("generation", "complete"),
    "completed_at": ("generation", "completed_at"),
    "version": ("format", "data_format_version"),
    "format": ("format", "layout"),
    "schema": ("format", "schema"),
    "shards": ("format", "shards"),
    "converted_from": ("format", "converted_from"),
    "skipped_corrupt": ("format", "skipped_corrupt"),
    "source_sample_index": ("format", "source_sample_index"),
}
# the flat `data` dict ({"path", "fingerprint", ...}) is the nested `data` section; `path` is renamed
_DATA_RENAMES = {"path": "prepared_path"}
SECTIONS = ("reproducibility", "model", "data", "hidden_states", "generation", "format")


def is_nested(raw: dict[str, Any]) -> bool:
    """A file in the seeds' structure (version "2.0"), as opposed to the first, flat one."""
    return isinstance(raw.get("version"), str) and isinstance(raw.get("format"), dict)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The file to write for the flat view `flat` (keys we do not know stay at the top level)."""
    out: dict[str, Any] = {"version": CONFIG_VERSION}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    data = flat.get("data")
    if isinstance(data, dict):
        sections["data"].update({_DATA_RENAMES.get(k, k): v for k, v in data.items()})
    elif data is not None:
        sections["data"]["train_data_path"] = data
    for key, value in flat.items():
        if key == "data":
            continue
        if key in _PLACES:
            section, name = _PLACES[key]
            (out if section is None else sections[section])[name] = value
        elif key not in out:
            out[key] = value
    layout = flat.get("format", "pt")
    sections["format"].setdefault("file_pattern", FILE_PATTERNS.get(str(layout), FILE_PATTERNS["pt"]))
    sections["format"].setdefault("data_format_version", 1)
    sections["format"].setdefault("layout", layout)
    if "layer_ids" in sections["hidden_states"]:
        sections["hidden_states"].setdefault("description", HIDDEN_STATES_DESCRIPTION)
    speculators_version = (flat.get("packages") or {}).get("speculators")
    if speculators_version and "speculators_version" not in out:
        out["speculators_version"] = speculators_version
    for name in SECTIONS:
        out[name] = sections[name]
    # the seeds' order: version, generated_at, speculators_version, then the sections
    order = ["version", "generated_at", "speculators_version", *SECTIONS]
    return {**{k: out[k] for k in order if k in out}, **{k: v for k, v in out.items() if k not in order}}


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """The flat view of a file of either version (a first-version file is returned as it is)."""
    if not is_nested(raw):
        return dict(raw)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in ("version", *SECTIONS) and key not in ("generated_at", "speculators_version"):
            flat[key] = value
    for key, (section, name) in _PLACES.items():
        holder = raw if section is None else (raw.get(section) or {})
        if isinstance(holder, dict) and name in holder:
            flat[key] = holder[name]
    back = {v: k for k, v in _DATA_RENAMES.items()}
    placed = {name for section, name in _PLACES.values() if section == "data"}
    data = {back.get(k, k): v for k, v in (raw.get("data") or {}).items() if k not in placed}
    if data:
        flat["data"] = data
    flat["config_version"] = raw["version"]
    return flat


def load(path: str | os.PathLike) -> dict[str, Any] | None:
    """The flat view of the file at `path`, None when there is none; bad JSON is a UserError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); regenerate it with `speculators datagen`") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return flatten(raw)


def write(path: str | os.PathLike, flat: dict[str, Any]) -> None:
    """Write the flat view `flat` as a file in the seeds' structure (atomically)."""
    clean = {k: v for k, v in flat.items() if k != "config_version"}
    atomic_write_json(Path(path), nest(clean))


def tensor_schema(num_layers: int, hidden_size: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """The seeds' per-tensor schema of a version-1 sample file (fp8: with its per-row scales)."""
    out = {
        "input_ids": {"dtype": "torch.long", "shape": "[seq_len]", "description": "Tokenized input sequence"},
        "hidden_states": {
            "dtype": f"list[torch.{dtype}]",
            "shape": f"list of [seq_len, {hidden_size}]",
            "num_tensors": num_layers,
            "description": f"Hidden states from {num_layers} layers, in hidden_states.layer_ids order; the last "
                           "is the verifier's final layer before its norm",
        },
        "loss_mask": {"dtype": "torch.long", "shape": "[seq_len]",
                      "description": "1 for assistant tokens to train on, 0 elsewhere"},
    }
    if dtype == "float8_e4m3fn":
        out["hidden_states_scale"] = {
            "dtype": "list[torch.float32]", "shape": "list of [seq_len]", "num_tensors": num_layers,
            "description": "per-row scale of hidden_states: value = fp8 * scale (scale = max|row| / 448, "
                           "1 for an all-zero row); readers return bf16",
        }
    return out
