"""The datagen runner: prepared dataset -> hidden-state files, for any backend.

It owns everything backends should not repeat:

* layer ids resolved and validated against the verifier config before loading it;
* ``data_config.json`` written first (so a mismatched rerun fails fast) and
  completed at the end with per-sample lengths;
* resume: samples whose ``data_<i>.pt`` exists are skipped; files are written to
  a temp name and renamed, so a killed run leaves no half file (stale temp files
  from a killed run are removed on the next start);
* batching by length (longest first: padding stays small and an out-of-memory
  shows up in the first batch, not after hours);
* ``--format safetensors``: pt files are staged in ``DIR/.pt-staging`` (still
  resumable) and converted into shards at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from speculators.config.datagen import DatagenConfig
from speculators.data import data_config as dc
from speculators.data.hs_quant import RECORDED_NAME
from speculators.data.formats import (
    DATA_CONFIG_NAME,
    DATA_FORMAT_VERSION,
    convert_pt_to_safetensors,
    finished_pt_indices,
    write_pt_sample,
)
from speculators.data.prepare import PREPARE_CONFIG, load_prepared
from speculators.datagen.base import GeneratorSpec, HiddenStateGenerator, create_generator
from speculators.errors import UserError
from speculators.layers import resolve_layer_ids
from speculators.progress import Progress

logger = logging.getLogger(__name__)

STAGING = ".pt-staging"
STORE_DTYPE = torch.bfloat16

LAYER_CONVENTION = (
    "id i < num_hidden_layers: residual stream entering decoder layer i (transformers "
    "hidden_states[i], vLLM aux hidden state i; id 0 = embeddings); id num_hidden_layers: "
    "output of the last decoder layer BEFORE the final norm. The last entry is always the "
    "final layer; the trainer applies the verifier's norm + lm_head to it. File data_<i>.pt "
    "holds row i of the prepared dataset."
)


@dataclass
class DatagenResult:
    output_dir: str
    total: int
    generated: int
    skipped_existing: int
    seconds: float
    tokens_per_s: float


def _package_versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    names = ["speculators", "torch", "transformers", "datasets", "safetensors"]
    if backend == "vllm":
        names.append("vllm")
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_model_shape(model_path: str) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) of the verifier, from its config only."""
    from speculators.verifier import config_int, read_verifier_config

    text = read_verifier_config(model_path, flag="--target-model-path")
    flag = "--target-model-path"
    return config_int(text, "num_hidden_layers", model_path, flag), config_int(text, "hidden_size", model_path, flag)


def _data_identity(train_data_path: str) -> dict[str, Any]:
    meta_path = Path(train_data_path) / PREPARE_CONFIG
    fingerprint = None
    if meta_path.is_file():
        try:
            fingerprint = json.loads(meta_path.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            pass
    return {"path": str(Path(train_data_path).resolve()), "fingerprint": fingerprint}


def _same_model(a: Any, b: Any) -> bool:
    """Same id, or two spellings of the same local directory."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return False


def _command(cfg: DatagenConfig) -> str:
    """The command line that reproduces this run (flags as given)."""
    import shlex

    from speculators.config.base import explicit_argv

    extra = ["--", *cfg.extra_args] if cfg.extra_args else []
    return shlex.join(["speculators", "datagen", *explicit_argv(cfg), *extra])


def _gpu_name() -> str | None:
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not stop datagen from recording what it can
        return None


def _check_compatible(existing: dict[str, Any], new: dict[str, Any], where: Path) -> None:
    for key in ("model", "layer_ids", "hidden_size", "num_hidden_layers", "format"):
        if key == "model" and _same_model(existing.get(key), new.get(key)):
            continue
        if existing.get(key) != new.get(key):
            raise UserError(
                f"{where} was generated with {key}={existing.get(key)!r}, this run has "
                f"{new.get(key)!r}; use a new --output-dir (or delete the old one)"
            )
    old_dtype = existing.get("hidden_states_dtype") or "bfloat16"  # absent: written before fp8 existed
    if old_dtype != new.get("hidden_states_dtype"):
        raise UserError(
            f"{where} holds hidden states stored as {old_dtype}, this run stores "
            f"{new.get('hidden_states_dtype')} (--hidden-states-dtype); use a new --output-dir (or delete the old one)"
        )
    old_data, new_data = existing.get("data"), new.get("data")
    old_fp = old_data.get("fingerprint") if isinstance(old_data, dict) else None
    new_fp = new_data.get("fingerprint") if isinstance(new_data, dict) else None
    if old_fp and new_fp and old_fp != new_fp:
        raise UserError(
            f"{where} was generated from a different prepared dataset (fingerprint {old_fp} vs "
            f"{new_fp}); use a new --output-dir"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    """The flat view of an existing data_config.json (either version), None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic), but a hand edit can: rewrite it
    return dc.flatten(raw) if isinstance(raw, dict) else None


def _remove_stale_temps(directory: Path) -> int:
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(".data_") and name.endswith(".tmp"):
            os.unlink(directory / name)
            removed += 1
    return removed


def run_datagen(
    cfg: DatagenConfig,
    generator_factory: Callable[[GeneratorSpec], HiddenStateGenerator] | None = None,
) -> DatagenResult:
    """Generate hidden states for the first ``max_samples`` rows of the prepared dataset.

    ``generator_factory`` replaces the backend lookup (tests, custom backends).
    """
    from speculators.datagen.prepare_input import (
        CHAT_TEMPLATE_NOTE,
        check_token_freq_target,
        resolve_prepared_input,
        token_freq_for,
        write_token_freq,
    )

    start = time.time()
    # types, bounds and choices were checked when `cfg` was built (speculators.config.datagen)
    num_layers, hidden_size = read_model_shape(cfg.target_model_path)
    layer_ids = resolve_layer_ids(cfg.layer_ids, num_layers, cfg.include_last_layer)
    prepared = resolve_prepared_input(cfg)  # a source is prepared (or its cached copy found) here
    data = load_prepared(prepared.path)
    for col in ("input_ids", "loss_mask"):
        if col not in data.column_names:
            raise UserError(f"--train-data-path {prepared.path}: dataset lacks column {col!r}")
    total = len(data) if cfg.max_samples is None else min(cfg.max_samples, len(data))
    if total == 0:
        raise UserError(f"--train-data-path {prepared.path}: the prepared dataset is empty")
    freq = token_freq_for(prepared.path, data, total)
    out_freq = Path(cfg.output_dir) / "token_freq.pt"
    extra_freq = None
    if cfg.token_freq_path and Path(cfg.token_freq_path).resolve() != out_freq.resolve():
        extra_freq = check_token_freq_target(cfg.token_freq_path, freq)  # refused before any work

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / STAGING if cfg.format == "safetensors" else out
    work.mkdir(parents=True, exist_ok=True)

    packages = _package_versions(cfg.backend)
    sources = prepared.sources
    config: dict[str, Any] = {
        "version": DATA_FORMAT_VERSION,
        "format": "pt",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "speculators_version": packages.get("speculators"),
        "command": _command(cfg),
        "packages": packages,
        "gpu": _gpu_name(),
        "model": cfg.target_model_path,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "data": {
            **_data_identity(str(prepared.path)),
            "train_data_path": sources[0] if len(sources) == 1 else sources,
            "seq_length": prepared.params.get("seq_length"),
            "max_samples": cfg.max_samples,
            "seed": prepared.params.get("seed"),
            "chat_template_note": CHAT_TEMPLATE_NOTE,
        },
        "layer_ids": layer_ids,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "hidden_states_dtype": RECORDED_NAME[cfg.hidden_states_dtype],
        "layer_convention": LAYER_CONVENTION,
        "cache_dir": str(prepared.cache_dir) if prepared.cache_dir else None,
        "batch_size": cfg.batch_size,
        "schema": dc.tensor_schema(len(layer_ids), hidden_size, RECORDED_NAME[cfg.hidden_states_dtype]),
        "complete": False,
    }
    config_path = work / DATA_CONFIG_NAME
    final_path = out / DATA_CONFIG_NAME
    final = _read_json(final_path)
    if cfg.format == "safetensors" and final is not None:
        if final.get("format") != "safetensors":
            raise UserError(f"{out} already holds pt-format data; use a new --output-dir for --format safetensors")
        _check_compatible(final, dict(config, format="safetensors"), final_path)
        done = sum(len(s["sample_index"]) for s in final.get("shards", []))
        if done >= total:
            logger.info("datagen: %s is already complete (%d samples)", out, done)
            return DatagenResult(str(out), total, 0, done, time.time() - start, 0.0)
        raise UserError(
            f"{out} holds a finished safetensors dataset of {done} samples; use a new --output-dir "
            f"to generate {total}"
        )
    existing = _read_json(config_path)
    if existing is not None:
        if existing.get("format", "pt") != "pt":
            raise UserError(f"{out} holds {existing.get('format')}-format data; use a new --output-dir")
        _check_compatible(existing, config, config_path)
        config["generated_at"] = existing.get("generated_at", config["generated_at"])

    stale = _remove_stale_temps(work)
    if stale:
        logger.info("datagen: removed %d temp file(s) left by an interrupted run", stale)
    dc.write(config_path, config)

    finished = finished_pt_indices(work)
    lengths_all = [len(x) for x in data.select(range(total))["input_ids"]]
    todo = [i for i in range(total) if i not in finished]
    skipped = total - len(todo)
    if skipped:
        logger.info("datagen: resuming, %d of %d samples already done", skipped, total)
    todo.sort(key=lambda i: (-lengths_all[i], i))

    spec = GeneratorSpec(
        model_path=cfg.target_model_path,
        layer_ids=layer_ids,
        device=cfg.device,
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        extra_args=list(cfg.extra_args),
    )
    generated = 0
    tokens = 0
    gen_start = time.time()
    if todo:
        generator = generator_factory(spec) if generator_factory else create_generator(cfg.backend, spec)
        try:
            if generator.hidden_size != hidden_size or generator.num_hidden_layers != num_layers:
                raise UserError(
                    f"backend reports hidden_size={generator.hidden_size}, layers="
                    f"{generator.num_hidden_layers}; the config says {hidden_size}, {num_layers}"
                )
            config["backend"] = {"name": cfg.backend, **generator.describe()}
            dc.write(config_path, config)
            last_log = time.time()
            progress = Progress()
            progress.update(skipped, total)
            for b in range(0, len(todo), cfg.batch_size):
                idx = todo[b : b + cfg.batch_size]
                rows = data.select(idx)
                batch_ids = [list(map(int, r)) for r in rows["input_ids"]]
                batch_mask = [list(map(int, r)) for r in rows["loss_mask"]]
                states = generator.generate(batch_ids)
                if len(states) != len(idx):
                    raise RuntimeError(f"backend returned {len(states)} samples for a batch of {len(idx)}")
                for i, ids, mask, layers in zip(idx, batch_ids, batch_mask, states):
                    _check_states(layers, len(ids), len(layer_ids), hidden_size, i)
                    write_pt_sample(
                        work,
                        i,
                        {
                            "input_ids": torch.tensor(ids, dtype=torch.long),
                            "loss_mask": torch.tensor(mask, dtype=torch.long),
                            "hidden_states": [h.to(STORE_DTYPE) for h in layers],
                        },
                        storage=cfg.hidden_states_dtype,
                    )
                    generated += 1
                    tokens += len(ids)
                progress.update(skipped + generated, total)
                if time.time() - last_log > 30:
                    last_log = time.time()
                    logger.info(
                        "datagen: %d/%d samples (%.0f tok/s)",
                        skipped + generated, total, tokens / max(time.time() - gen_start, 1e-9),
                    )
        finally:
            generator.close()

    config["complete"] = True
    config["num_samples"] = total
    config["lengths"] = {str(i): lengths_all[i] for i in range(total)}
    config["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    dc.write(config_path, config)

    if cfg.format == "safetensors":
        convert_pt_to_safetensors(work, out, on_corrupt="raise")
        shutil.rmtree(work)
    write_token_freq(out_freq, freq)  # beside data_config.json, as the public scripts do
    if extra_freq is not None:
        write_token_freq(extra_freq, freq)
        logger.info("datagen: token frequencies written to %s and %s", out_freq, extra_freq)

    seconds = time.time() - start
    tps = tokens / max(time.time() - gen_start, 1e-9) if tokens else 0.0
    logger.info(
        "datagen: %d samples generated, %d already done -> %s (%.1fs, %.0f tok/s)",
        generated, skipped, out, seconds, tps,
    )
    return DatagenResult(str(out), total, generated, skipped, seconds, tps)


def _check_states(layers: list[torch.Tensor], length: int, num_layers: int, hidden: int, index: int) -> None:
    if len(layers) != num_layers:
        raise RuntimeError(f"sample {index}: backend returned {len(layers)} layers, expected {num_layers}")
    for k, h in enumerate(layers):
        if tuple(h.shape) != (length, hidden):
            raise RuntimeError(
                f"sample {index}: backend returned layer {k} with shape {tuple(h.shape)}, "
                f"expected ({length}, {hidden})"
            )
