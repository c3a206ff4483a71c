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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from speculators.data.chat import (
    Conversation,
    check_chat_template,
    encode_conversations,
    encode_turn_rows,
    end_of_turn_ids,
)
from speculators.data.sources import (
    BadConversation,
    DataSpec,
    iter_records,
    load_hub_dataset,
    normalize_record,
    record_tools,
    resolve_data,
)
from speculators.config.prepare import PrepareConfig
from speculators.errors import UserError
from speculators.progress import Progress

logger = logging.getLogger(__name__)

PREPARE_VERSION = 2  # bump when the output of the same inputs changes
PREPARE_CONFIG = "prepare_config.json"
TOKEN_FREQ = "token_freq.pt"


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


def fingerprint(cfg: PrepareConfig, tok_fp: str, specs: list[DataSpec]) -> str:
    h = hashlib.sha256()
    params = {
        "version": PREPARE_VERSION,
        "seq_length": cfg.seq_length,
        "max_samples": cfg.max_samples,
        "seed": cfg.seed,
        "rows": cfg.rows,
        "train_reasoning": cfg.train_reasoning,
        "train_after_end_of_turn": cfg.train_after_end_of_turn,
        "opening_assistant": cfg.opening(),
        "data": [spec.fingerprint() for spec in specs],
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


def source_quotas(specs: list[DataSpec], total: int | None) -> list[int | None]:
    """Samples to take from each source: its ``max``, and with ``total`` (--max-samples) a
    share of it by ``weight`` (1 when not given; largest remainders get the leftovers)."""
    if total is None:
        if any(s.weight is not None for s in specs):
            raise UserError("--data ...,weight=W splits --max-samples between sources; give --max-samples too")
        return [s.max_samples for s in specs]
    weights = [s.weight if s.weight is not None else 1.0 for s in specs]
    shares = [total * w / sum(weights) for w in weights]
    quotas = [int(x) for x in shares]
    order = sorted(range(len(specs)), key=lambda i: (-(shares[i] - quotas[i]), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return [min(q, s.max_samples) if s.max_samples is not None else q for q, s in zip(quotas, specs)]


def drop_opening_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove assistant messages before the first non-assistant one (nothing prompted them)."""
    k = 0
    while k < len(messages) and messages[k]["role"] == "assistant":
        k += 1
    if k == len(messages) or not any(m["role"] == "assistant" for m in messages[k:]):
        raise BadConversation("no assistant turn")
    return messages[k:]


@dataclass
class _Collected:
    input_ids: list[list[int]] = field(default_factory=list)
    loss_masks: list[list[int]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


def _encode_batch(tokenizer, convs: list[Conversation], eot: set[int], cfg: PrepareConfig):
    """Yield ``(ids, mask, truncated)`` rows or `BadConversation` per conversation, in order."""
    if cfg.rows == "per-conversation":
        yield from encode_conversations(
            tokenizer, convs, eot, max_tokens=cfg.seq_length, train_reasoning=cfg.train_reasoning
        )
        return
    for conv in convs:
        try:
            rows = encode_turn_rows(
                tokenizer, conv, eot, cfg.seq_length,
                train_after_end_of_turn=cfg.train_after_end_of_turn, train_reasoning=cfg.train_reasoning,
            )
        except BadConversation as exc:
            yield exc
            continue
        if not rows:
            yield BadConversation("no assistant tokens after truncation")
        yield from rows


def _collect(spec: DataSpec, quota: int | None, tokenizer, eot: set[int], cfg: PrepareConfig,
             progress: Callable[[int], None] = lambda kept: None) -> _Collected:
    out = _Collected()
    for raw_batch in _batches(ordered_records(spec, cfg.seed), cfg.batch_size):
        convs = []
        for record in raw_batch:
            try:
                messages = normalize_record(record)
                if cfg.opening() == "drop":
                    messages = drop_opening_assistant(messages)
                convs.append(Conversation(messages, record_tools(record)))
            except BadConversation as exc:
                out.dropped[str(exc)] += 1
        for result in _encode_batch(tokenizer, convs, eot, cfg):
            if isinstance(result, BadConversation):
                out.dropped[_reason(result)] += 1
                continue
            ids, mask, was_truncated = result
            if not any(mask):
                out.dropped["no assistant tokens after truncation"] += 1
                continue
            out.truncated += int(was_truncated)
            out.input_ids.append(ids)
            out.loss_masks.append(mask)
            progress(len(out.input_ids))
            if quota is not None and len(out.input_ids) >= quota:
                return out
    return out


def _plan(cfg: PrepareConfig):
    """(tokenizer, end-of-turn ids, sources, fingerprint) of a prepare-data run."""
    tokenizer = load_tokenizer(cfg.model)
    eot = end_of_turn_ids(tokenizer, cfg.model)
    specs = [resolve_data(d) for d in cfg.sources()]
    return tokenizer, eot, specs, fingerprint(cfg, tokenizer_fingerprint(tokenizer, eot), specs)


def prepare_fingerprint(cfg: PrepareConfig) -> str:
    """The cache key prepare-data gives these settings (tokenizer, chat template, sources, parameters);
    `cfg.output` plays no part, so a cache can be keyed by it before anything is written."""
    return _plan(cfg)[3]


def token_frequencies(input_ids, loss_masks) -> dict[int, int]:
    """token id -> count over loss-masked tokens (what token_freq.pt holds)."""
    freq: Counter[int] = Counter()
    for ids, mask in zip(input_ids, loss_masks):
        freq.update(int(i) for i, m in zip(ids, mask) if m)
    return {int(k): int(v) for k, v in sorted(freq.items())}


def prepare_data(cfg: PrepareConfig) -> PrepareResult:
    start = time.time()
    # types, bounds and choices were checked when `cfg` was built (speculators.config.prepare)
    if cfg.train_after_end_of_turn and cfg.rows != "per-turn":
        raise UserError("--train-after-end-of-turn applies to --rows per-turn (the public package's layout)")
    if not cfg.sources():
        raise UserError("--data: give at least one source")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / PREPARE_CONFIG).is_file():
        raise UserError(
            f"--output {output} is a non-empty directory not written by prepare-data; "
            "choose a new directory"
        )
    tokenizer, eot, specs, fp = _plan(cfg)
    quotas = source_quotas(specs, cfg.max_samples)

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
    per_source = []
    # the dashboard's stage bar: samples kept of those asked for (known only with a quota per source)
    bar, goal = Progress(), (sum(quotas) if all(q is not None for q in quotas) else None)
    for spec, quota in zip(specs, quotas):
        base = len(input_ids)
        got = _collect(spec, quota, tokenizer, eot, cfg, lambda kept, base=base: bar.update(base + kept, goal))
        if quota is not None and len(got.input_ids) < quota:
            logger.warning("prepare-data: %s gave %d usable samples (asked for %d)", spec.name, len(got.input_ids), quota)
        input_ids += got.input_ids
        loss_masks += got.loss_masks
        dropped.update(got.dropped)
        truncated += got.truncated
        per_source.append({**spec.describe(), "quota": quota, "kept": len(got.input_ids),
                           "dropped": dict(got.dropped), "truncated": got.truncated})
    if len(specs) > 1:  # interleave the sources (deterministically)
        order = list(range(len(input_ids)))
        random.Random(cfg.seed).shuffle(order)
        input_ids = [input_ids[i] for i in order]
        loss_masks = [loss_masks[i] for i in order]
    freq = token_frequencies(input_ids, loss_masks)

    total_dropped = sum(dropped.values())
    if not input_ids:
        raise UserError(
            f"--data {', '.join(cfg.sources())}: no usable conversations ({total_dropped} dropped: {dict(dropped)})"
        )
    if cfg.max_samples is not None and len(input_ids) < cfg.max_samples:
        logger.warning("prepare-data: only %d usable samples (asked for %d)", len(input_ids), cfg.max_samples)

    result = PrepareResult(
        output=str(output),
        kept=len(input_ids),
        dropped=dict(dropped),
        truncated=truncated,
        assistant_tokens=sum(freq.values()),
        total_tokens=sum(len(x) for x in input_ids),
        fingerprint=fp,
    )
    _write_output(output, input_ids, loss_masks, freq, cfg, tokenizer, specs, per_source, result)
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


def _write_output(output, input_ids, loss_masks, freq, cfg, tokenizer, specs, per_source, result) -> None:
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
            "params": {**{k: v for k, v in cfg.model_dump().items() if k not in ("force", "output", "batch_size")},
                       "opening_assistant": cfg.opening()},
            "tokenizer": {
                "name_or_path": cfg.model,
                "vocab_size": len(tokenizer),
                "end_of_turn_ids": sorted(end_of_turn_ids(tokenizer, cfg.model)),
            },
            "data": specs[0].describe() if len(specs) == 1 else {"sources": [s.name for s in specs]},
            "sources": per_source,
            "regenerated": regenerated_by(specs[0]) if len(specs) == 1 else [regenerated_by(s) for s in specs],
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
