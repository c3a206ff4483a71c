"""`prepare-data`: conversations -> tokenized HF dataset with an assistant loss mask.

Output directory (see docs/ARCHITECTURE.md):
  ``datasets`` arrow shards with ``input_ids``/``loss_mask``, ``token_freq.pt``
  (target id -> count over loss-masked tokens) and ``prepare_config.json``.

The run is cached: when ``prepare_config.json`` already holds the same
fingerprint (tokenizer + chat template + parameters + data identity + code
version), nothing is recomputed. The directory is built beside the target and
renamed into place, so an interrupted run never leaves a half dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from speculators.data.chat import check_chat_template, encode_conversations, end_of_turn_ids
from speculators.data.sources import (
    BadConversation,
    DataSpec,
    iter_records,
    load_hub_dataset,
    normalize_record,
    resolve_data,
)
from speculators.errors import UserError

logger = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the output of the same inputs changes
PREPARE_CONFIG = "prepare_config.json"
TOKEN_FREQ = "token_freq.pt"


@dataclass
class PrepareConfig:
    model: str
    data: str
    output: str
    seq_length: int
    max_samples: int | None = None
    seed: int = 0
    batch_size: int = 512
    force: bool = False


@dataclass
class PrepareResult:
    output: str
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    assistant_tokens: int = 0
    total_tokens: int = 0
    cached: bool = False
    fingerprint: str = ""
    seconds: float = 0.0


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise UserError(
            f"--model {model}: cannot load its tokenizer ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local model directory or a "
            "reachable Hugging Face model id"
        ) from None
    check_chat_template(tok, model)
    return tok


def tokenizer_fingerprint(tokenizer, eot_ids: set[int]) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(sorted(eot_ids)).encode())
    h.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    return h.hexdigest()


def fingerprint(cfg: PrepareConfig, tok_fp: str, spec: DataSpec) -> str:
    h = hashlib.sha256()
    params = {
        "version": PREPARE_VERSION,
        "seq_length": cfg.seq_length,
        "max_samples": cfg.max_samples,
        "seed": cfg.seed,
        "data": spec.fingerprint(),
        "tokenizer": tok_fp,
    }
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:24]


def ordered_records(spec: DataSpec, seed: int) -> Iterator[Any]:
    """All records, shuffled deterministically by ``seed`` (hub datasets shuffle lazily)."""
    if spec.kind == "hub":
        return iter(load_hub_dataset(spec).shuffle(seed=seed))
    records = list(iter_records(spec))
    random.Random(seed).shuffle(records)
    return iter(records)


def _batches(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def regenerated_by(spec: DataSpec) -> dict[str, Any] | None:
    """How `speculators regenerate` wrote a jsonl source (its first record's settings), else None."""
    if spec.kind != "jsonl":
        return None
    try:
        with open(spec.path, encoding="utf-8") as f:  # type: ignore[arg-type]
            first = next((line for line in f if line.strip()), "")
        meta = json.loads(first).get("regenerated") if first else None
    except (OSError, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


def read_cached(output: Path, fp: str) -> dict[str, Any] | None:
    path = output / PREPARE_CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("fingerprint") != fp:
        return None
    if not (output / TOKEN_FREQ).is_file() or not (output / "dataset_info.json").is_file():
        return None
    return meta


def prepare_data(cfg: PrepareConfig) -> PrepareResult:
    start = time.time()
    if cfg.seq_length < 2:
        raise UserError(f"--seq-length must be >= 2, got {cfg.seq_length}")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {cfg.max_samples}")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / PREPARE_CONFIG).is_file():
        raise UserError(
            f"--output {output} is a non-empty directory not written by prepare-data; "
            "choose a new directory"
        )
    tokenizer = load_tokenizer(cfg.model)
    eot = end_of_turn_ids(tokenizer, cfg.model)
    spec = resolve_data(cfg.data)
    fp = fingerprint(cfg, tokenizer_fingerprint(tokenizer, eot), spec)

    cached = None if cfg.force else read_cached(output, fp)
    if cached is not None:
        logger.info("prepare-data: %s is up to date (fingerprint %s); nothing to do", output, fp)
        counts = cached.get("counts", {})
        return PrepareResult(
            output=str(output),
            kept=counts.get("kept", 0),
            dropped=counts.get("dropped", {}),
            truncated=counts.get("truncated", 0),
            assistant_tokens=counts.get("assistant_tokens", 0),
            total_tokens=counts.get("total_tokens", 0),
            cached=True,
            fingerprint=fp,
            seconds=time.time() - start,
        )

    input_ids: list[list[int]] = []
    loss_masks: list[list[int]] = []
    dropped: Counter[str] = Counter()
    truncated = 0
    freq: Counter[int] = Counter()
    target = cfg.max_samples
    for raw_batch in _batches(ordered_records(spec, cfg.seed), cfg.batch_size):
        convs = []
        for record in raw_batch:
            try:
                convs.append(normalize_record(record))
            except BadConversation as exc:
                dropped[str(exc)] += 1
        for result in encode_conversations(tokenizer, convs, eot, max_tokens=cfg.seq_length):
            if isinstance(result, BadConversation):
                dropped[_reason(result)] += 1
                continue
            ids, mask, was_truncated = result
            if not any(mask):
                dropped["no assistant tokens after truncation"] += 1
                continue
            truncated += int(was_truncated)
            input_ids.append(ids)
            loss_masks.append(mask)
            freq.update(i for i, m in zip(ids, mask) if m)
            if target is not None and len(input_ids) >= target:
                break
        if target is not None and len(input_ids) >= target:
            break

    total_dropped = sum(dropped.values())
    if not input_ids:
        raise UserError(
            f"--data {cfg.data}: no usable conversations ({total_dropped} dropped: {dict(dropped)})"
        )
    if target is not None and len(input_ids) < target:
        logger.warning("prepare-data: only %d usable conversations (asked for %d)", len(input_ids), target)

    result = PrepareResult(
        output=str(output),
        kept=len(input_ids),
        dropped=dict(dropped),
        truncated=truncated,
        assistant_tokens=sum(freq.values()),
        total_tokens=sum(len(x) for x in input_ids),
        fingerprint=fp,
    )
    _write_output(output, input_ids, loss_masks, freq, cfg, tokenizer, spec, result)
    result.seconds = time.time() - start
    logger.info(
        "prepare-data: kept %d samples (%d tokens, %d assistant), truncated %d, dropped %d %s -> %s (%.1fs)",
        result.kept, result.total_tokens, result.assistant_tokens, truncated, total_dropped,
        dict(dropped) if dropped else "", output, result.seconds,
    )
    return result


def _reason(exc: BadConversation) -> str:
    text = str(exc)
    return text if not text.startswith("chat template error") else "chat template error"


def _write_output(output, input_ids, loss_masks, freq, cfg, tokenizer, spec, result) -> None:
    import datasets
    import torch

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "loss_mask": datasets.Sequence(datasets.Value("int8")),
        }
    )
    ds = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_masks}, features=features)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{int(time.time() * 1000)}"
    try:
        ds.save_to_disk(str(tmp))
        torch.save({int(k): int(v) for k, v in sorted(freq.items())}, tmp / TOKEN_FREQ)
        meta = {
            "version": PREPARE_VERSION,
            "fingerprint": result.fingerprint,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {k: v for k, v in asdict(cfg).items() if k not in ("force", "output", "batch_size")},
            "tokenizer": {
                "name_or_path": cfg.model,
                "vocab_size": len(tokenizer),
                "end_of_turn_ids": sorted(end_of_turn_ids(tokenizer, cfg.model)),
            },
            "data": {"kind": spec.kind, "name": spec.name, "hub_id": spec.hub_id, "split": spec.split},
            "regenerated": regenerated_by(spec),
            "counts": {
                "kept": result.kept,
                "dropped": result.dropped,
                "dropped_total": sum(result.dropped.values()),
                "truncated": result.truncated,
                "total_tokens": result.total_tokens,
                "assistant_tokens": result.assistant_tokens,
            },
        }
        (tmp / PREPARE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if output.exists():
            old = output.parent / f".{output.name}.old-{int(time.time() * 1000)}"
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(path: str | Path):
    """Open a prepare-data output as a `datasets.Dataset`, with a clear error if it is not one."""
    import datasets

    path = Path(path)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise UserError(f"{path} is not a prepare-data output directory (no dataset_info.json); run `speculators prepare-data` first")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: cannot load the prepared dataset ({exc})") from None
