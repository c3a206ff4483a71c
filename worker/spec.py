"""A run's parameters and their validation.

The dashboard form and any other client build a run's settings (`RunSettings`, the schema of
speculators.config.run) through `validate_spec(raw, settings)`, which returns per-field error messages so the
form can show each one next to its field. Paths are confined to the configured
roots: a dataset must resolve inside the data root, a local model inside the
models or data root, so `../../etc/passwd` or a symlink out never gets through.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from runstore.settings import Settings
from speculators.config.device import resolve_device
from speculators.config.memory import VerifierDims, check_train_memory
from speculators.config.run import BUILTIN_DATASETS, RunSettings, parse_layer_ids, split_endpoints
from speculators.config.stages import StagePaths, train_config_for
from speculators.errors import UserError
from speculators.layers import resolve_layer_ids

__all__ = ["memory_refusal", "validate_spec"]

_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


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


def resolve_eval_data(raw: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """Return (held-out prompts argument, error): empty is the training data's validation rows;
    otherwise a built-in dataset or a file or directory (a prepared dataset, hidden states,
    conversations) inside the data root, relative paths taken under it."""
    value = (raw or "").strip()
    if not value:
        return None, None
    if value in BUILTIN_DATASETS:
        return value, None
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = settings.data_root / p
    if not inside(p, settings.data_root):
        return value, f"must be inside the data root {settings.data_root} (no '..' or links out of it)"
    if not p.exists():
        return value, f"no such file or directory under the data root: {p.resolve()}"
    return str(p.resolve()), None


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


def _int(value: Any) -> int:
    """A form value the schema accepted as a whole number ("16", " 16 ", 16), as that number."""
    return TypeAdapter(int).validate_python(value) if value not in (None, "") else 0


def _source_key(dataset: str) -> tuple[str, int, int]:
    """What identifies a dataset's content for the census cache: a file's size and mtime."""
    p = Path(dataset)
    try:
        st = p.stat()
        return dataset, st.st_size, st.st_mtime_ns
    except OSError:
        return dataset, 0, 0


@functools.lru_cache(maxsize=64)
def _census(key: tuple[str, int, int], need: int):
    from speculators.data.census import count_usable

    return count_usable(key[0], need)


def samples_error(dataset: str, max_samples: int) -> str | None:
    """The message for a sample count the dataset cannot give (counted before anything is
    stored, so a run never prepares a whole dataset to drop most of it), or None."""
    try:
        census = _census(_source_key(dataset), max_samples)
    except (UserError, OSError, ValueError) as exc:
        return f"cannot read the dataset to count its conversations: {exc}"
    if census is None or not census.complete or census.usable >= max_samples:
        return None
    why = "; ".join(f"{reason}: {n}" for reason, n in census.dropped.most_common(3))
    found = (f"the dataset has {census.usable} usable conversations (of {census.records} records"
             + (f"; not usable: {why}" if why else "") + ")")
    if census.usable == 0:
        return found + ": choose a dataset of chats with assistant replies"
    return found + f": use at most {census.usable}"


def endpoint_error(url: str, timeout_s: float = 2.0) -> str | None:
    """Whether a user's vLLM URL accepts connections now (any HTTP answer counts: vLLM answers
    503 while it loads). The message to show, or None."""
    from worker.runner import probe_health

    ok, said = probe_health(url, timeout=timeout_s)
    if ok or said.startswith("HTTP"):
        return None
    return (f"cannot reach {url.rstrip('/')}/health ({said}): start vLLM there first "
            "(`speculators launch-vllm MODEL`), fix the URL, or leave it empty and choose GPUs")


def validate_spec(raw: dict[str, Any], settings: Settings, *, free_memory: int | None = None,
                  names_taken: Collection[str] = (), check_endpoint: Callable[[str], str | None] | None
                  = endpoint_error) -> tuple[RunSettings | None, dict[str, str]]:
    """Check every field; return the spec, or None and {field: message}.

    Types and bounds come from the schema (the messages `speculators train` gives); this adds
    what needs the installation: paths inside its roots, its GPU count, the verifier's layer
    count and vocabulary, whether the trainer's memory fits (`free_memory` overrides the
    measured free bytes, for tests), a name no other run has (`names_taken`), a sample count
    the dataset can give, and an online run's vLLM URL answering (`check_endpoint`; None
    skips it).
    """
    data = {k: v for k, v in raw.items() if k in RunSettings.model_fields}
    for key in ("name", "model", "dataset"):
        data.setdefault(key, "")
    _, errors = RunSettings.errors_of(data)

    model, err = resolve_model(str(raw.get("model") or ""), settings)
    if err:
        errors["model"] = err
    dataset, err = resolve_dataset(str(raw.get("dataset") or ""), settings)
    if err:
        errors["dataset"] = err
    data.update(model=model, dataset=dataset)
    if "eval_data" not in errors:
        eval_data, err = resolve_eval_data(data.get("eval_data"), settings)
        if err:
            errors["eval_data"] = err
        data["eval_data"] = eval_data
    name = str(data.get("name") or "").strip()
    if "name" not in errors and name in set(names_taken):
        errors["name"] = "another run already has this name: choose a different one"
    if "dataset" not in errors and "max_samples" not in errors:
        samples = data.get("max_samples", RunSettings.model_fields["max_samples"].default)
        err = samples_error(dataset, _int(samples))
        if err:
            errors["max_samples"] = err
    if "gpus" not in errors and _int(data.get("gpus")) > max(settings.max_gpus, 0):
        errors["gpus"] = (f"must be between 0 and {settings.max_gpus}" if settings.max_gpus
                          else "this installation has no GPU worker: use 0 (CPU)")
    mode = str(data.get("mode") or "offline")
    if mode in ("online", "hybrid") and "mode" not in errors and "gpus" not in errors \
            and _int(data.get("gpus")) == 0 and not str(data.get("vllm_endpoint") or "").strip():
        errors["mode"] = f"{mode} training reads hidden states from a vLLM server: give its URL or choose GPUs"
    urls = split_endpoints(data.get("vllm_endpoint"))
    if mode in ("online", "hybrid") and urls and "vllm_endpoint" not in errors and check_endpoint is not None:
        # every server is checked; the message names each one that does not answer
        down = [err for err in map(check_endpoint, urls) if err]
        if down:
            errors["vllm_endpoint"] = (down[0] if len(urls) == 1 else
                                       f"{len(down)} of {len(urls)} servers do not answer: " + "; ".join(down))
    cfg = model_config(model, settings) if "model" not in errors else None
    dims = _dims(cfg) if cfg else None
    if cfg:
        n = dims.num_hidden_layers if dims else cfg.get("num_hidden_layers")
        if isinstance(n, int) and "layer_ids" not in errors:
            ids = parse_layer_ids(data.get("layer_ids"))
            if ids:
                try:  # the same rules datagen, launch-vllm and the trainer apply
                    resolve_layer_ids(ids, n, include_last_layer=True, flag="layer ids")
                except UserError as exc:
                    errors["layer_ids"] = str(exc)
        vocab = dims.vocab_size if dims else cfg.get("vocab_size")
        if isinstance(vocab, int) and "draft_vocab_size" not in errors \
                and _int(data.get("draft_vocab_size")) > vocab:
            errors["draft_vocab_size"] = f"must not exceed the verifier's vocabulary ({vocab})"
    if errors:
        return None, errors
    spec = RunSettings.model_validate(data)
    # settings valid alone but not together: the trainer's own refusal, beside the run's field
    conflicts = train_config_for(spec.model_copy(update={"mode": "offline"}), StagePaths(Path("."))).option_conflicts()
    if conflicts:
        return None, conflicts
    if dims is not None:
        message = memory_refusal(spec, dims, free_memory)
        if message:
            return None, {"seq_length": message}
    return spec, {}


def _dims(cfg: dict[str, Any]) -> VerifierDims | None:
    try:
        return VerifierDims.from_config(cfg)
    except (TypeError, ValueError, KeyError):
        return None


def memory_refusal(spec: RunSettings, dims: VerifierDims, free_memory: int | None = None) -> str | None:
    """The trainer's own memory check (`check_train_memory`) of this run's training settings on
    this machine (RAM for CPU runs; GPU runs only when this process sees a GPU); its message, or
    None. `free_memory` overrides the measured free bytes (tests)."""
    on_gpu = spec.gpus > 0
    if on_gpu and free_memory is None and resolve_device("auto") != "cuda":
        return None  # the GPU worker's trainer checks before it trains
    ids = resolve_layer_ids(spec.layer_ids, dims.num_hidden_layers, include_last_layer=True, flag="layer ids")
    # the trainer's shapes do not depend on where its hidden states come from: the offline
    # settings of the same run (no verifier URL needed yet)
    train = train_config_for(spec.model_copy(update={"mode": "offline"}), StagePaths(Path(".")))
    try:
        check_train_memory(train, device="cuda" if on_gpu else "cpu", dims=dims, free=free_memory,
                           num_aux_layers=len(ids) - 1, label="sequence length")
    except UserError as exc:
        return str(exc)
    return None
