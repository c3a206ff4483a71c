"""A run's parameters and their validation.

The dashboard form and any other client build a `RunSpec` through
`validate_spec(raw, settings)`, which returns per-field error messages so the
form can show each one next to its field. Paths are confined to the configured
roots: a dataset must resolve inside the data root, a local model inside the
models or data root, so `../../etc/passwd` or a symlink out never gets through.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runstore.settings import Settings

MODES = ("offline", "online", "hybrid")
BUILTIN_DATASETS = ("sharegpt", "ultrachat")
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class RunSpec:
    name: str
    model: str
    dataset: str  # a built-in name or an absolute path inside the data root
    seq_length: int = 64
    max_samples: int = 16
    layer_ids: list[int] = field(default_factory=list)  # empty: the datagen default
    draft_vocab_size: int = 128
    epochs: int = 1
    lr: float = 1e-3
    ttt_steps: int = 2
    num_layers: int = 1
    mode: str = "offline"
    gpus: int = 0
    batch_size: int = 4
    seed: int = 0
    vllm_endpoint: str = ""  # online/hybrid: a running verifier; empty: the controller starts one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _int(raw: Any, name: str, lo: int, hi: int, errors: dict[str, str]) -> int:
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        errors[name] = f"must be a whole number between {lo} and {hi}"
        return lo
    if not lo <= value <= hi:
        errors[name] = f"must be between {lo} and {hi} (got {value})"
    return value


def _float(raw: Any, name: str, lo: float, hi: float, errors: dict[str, str]) -> float:
    try:
        value = float(str(raw).strip())
    except (TypeError, ValueError):
        errors[name] = f"must be a number in ({lo}, {hi}]"
        return hi
    if not (lo < value <= hi):
        errors[name] = f"must be in ({lo}, {hi}] (got {value})"
    return value


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_dataset(raw: str, settings: Settings) -> tuple[str, str | None]:
    """Return (dataset argument, error). Relative paths are taken under the data root."""
    value = (raw or "").strip()
    if not value:
        return value, "choose a built-in dataset or give a .jsonl file under the data root"
    if value in BUILTIN_DATASETS:
        return value, None
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = settings.data_root / p
    if not inside(p, settings.data_root):
        return value, f"must be inside the data root {settings.data_root} (no '..' or links out of it)"
    p = p.resolve()
    if p.suffix != ".jsonl":
        return value, "must be a .jsonl file (one conversation per line)"
    if not p.is_file():
        return value, f"no such file under the data root: {p}"
    return str(p), None


def model_config(model: str, settings: Settings) -> dict[str, Any] | None:
    """The config.json of a local model, or None for a hub id."""
    p = Path(model).expanduser()
    if p.is_absolute() and (p / "config.json").is_file():
        try:
            return json.loads((p / "config.json").read_text())
        except ValueError:
            return None
    return None


def resolve_model(raw: str, settings: Settings) -> tuple[str, str | None]:
    value = (raw or "").strip()
    if not value:
        return value, "give a Hugging Face model id (org/name) or a local model directory"
    if value.startswith(("/", ".", "~")):
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = settings.models_root / p
        if not (inside(p, settings.models_root) or inside(p, settings.data_root)):
            return value, f"a local model must be under {settings.models_root} or {settings.data_root}"
        p = p.resolve()
        if not (p / "config.json").is_file():
            return value, f"{p} has no config.json; give a model directory saved with save_pretrained"
        return str(p), None
    if ".." in value or not _HF_ID.match(value):
        return value, "not a valid model id: use org/name with letters, digits, '.', '_' or '-'"
    return value, None


def parse_layer_ids(raw: Any) -> list[int]:
    if isinstance(raw, (list, tuple)):
        return [int(x) for x in raw]
    text = str(raw or "").replace(" ", "")
    return [int(x) for x in text.split(",") if x] if text else []


def validate_spec(raw: dict[str, Any], settings: Settings) -> tuple[RunSpec | None, dict[str, str]]:
    """Check every field; return the spec, or None and {field: message}."""
    errors: dict[str, str] = {}
    name = str(raw.get("name") or "").strip()
    if not name:
        errors["name"] = "give the run a name"
    elif len(name) > 100:
        errors["name"] = "at most 100 characters"
    elif _CONTROL.search(name):
        errors["name"] = "no control characters or line breaks"

    model, err = resolve_model(str(raw.get("model") or ""), settings)
    if err:
        errors["model"] = err
    dataset, err = resolve_dataset(str(raw.get("dataset") or ""), settings)
    if err:
        errors["dataset"] = err

    seq_length = _int(raw.get("seq_length", 64), "seq_length", 16, 131072, errors)
    max_samples = _int(raw.get("max_samples", 16), "max_samples", 1, 10_000_000, errors)
    draft_vocab = _int(raw.get("draft_vocab_size", 128), "draft_vocab_size", 2, 1_000_000, errors)
    epochs = _int(raw.get("epochs", 1), "epochs", 1, 1000, errors)
    lr = _float(raw.get("lr", 1e-3), "lr", 0.0, 1.0, errors)
    ttt = _int(raw.get("ttt_steps", 2), "ttt_steps", 1, 16, errors)
    num_layers = _int(raw.get("num_layers", 1), "num_layers", 1, 16, errors)
    gpus = _int(raw.get("gpus", 0), "gpus", 0, max(settings.max_gpus, 0), errors)
    if "gpus" in errors and settings.max_gpus == 0:
        errors["gpus"] = "this installation has no GPU worker: use 0 (CPU)"
    batch_size = _int(raw.get("batch_size", 4), "batch_size", 1, 4096, errors)
    seed = _int(raw.get("seed", 0), "seed", 0, 2**31 - 1, errors)

    mode = str(raw.get("mode") or "offline")
    if mode not in MODES:
        errors["mode"] = f"must be one of {', '.join(MODES)}"
    endpoint = str(raw.get("vllm_endpoint") or "").strip()
    if endpoint and not re.match(r"^https?://[A-Za-z0-9.\-]+(:\d+)?(/.*)?$", endpoint):
        errors["vllm_endpoint"] = "must be an http(s)://host:port URL"
    if mode in ("online", "hybrid") and gpus == 0 and not endpoint:
        errors["mode"] = f"{mode} training reads hidden states from a vLLM server: give its URL or choose GPUs"

    try:
        layer_ids = parse_layer_ids(raw.get("layer_ids", ""))
    except ValueError:
        layer_ids = []
        errors["layer_ids"] = "comma-separated whole numbers, e.g. 2,4,7 (empty: the default layers)"
    if layer_ids and len(set(layer_ids)) != len(layer_ids):
        errors["layer_ids"] = "layer ids must be distinct"

    cfg = model_config(model, settings) if "model" not in errors else None
    if cfg:
        n = cfg.get("num_hidden_layers")
        if isinstance(n, int) and layer_ids and "layer_ids" not in errors:
            bad = [i for i in layer_ids if not 0 <= i <= n]
            if bad:
                errors["layer_ids"] = f"ids must be within [0, {n}] for this model ({n} layers); bad: {bad}"
        vocab = cfg.get("vocab_size")
        if isinstance(vocab, int) and draft_vocab > vocab and "draft_vocab_size" not in errors:
            errors["draft_vocab_size"] = f"must not exceed the verifier's vocabulary ({vocab})"

    if errors:
        return None, errors
    return RunSpec(name=name, model=model, dataset=dataset, seq_length=seq_length, max_samples=max_samples,
                   layer_ids=layer_ids, draft_vocab_size=draft_vocab, epochs=epochs, lr=lr, ttt_steps=ttt,
                   num_layers=num_layers, mode=mode, gpus=gpus, batch_size=batch_size, seed=seed,
                   vllm_endpoint=endpoint), {}
